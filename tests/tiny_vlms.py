"""Tiny, randomly initialised Hugging Face (vision-)language models for tests.

``build_tiny_vlm(name)`` returns a :class:`TinyVLM` holding a small model built
from its config class (no weights are downloaded) together with a batch of two
samples whose ``input_ids`` contain exactly as many image placeholder tokens as
the vision tower produces features, so the forward really consumes the images.

All batches use *left* padding: sample 1 has a shorter prompt than sample 0 and
is padded on the left with ``PAD`` (attention_mask 0).  Every architecture
below handles left padding (Qwen M-RoPE positions are derived from the mask,
Mllama pad rows get an all-zero cross-attention mask).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import transformers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MllamaConfig,
    MllamaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

ARCHITECTURES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
    "mllama",
    "internvl",
    "llama",
)

# Token id layout shared by all models (vocab of 256 ids).
VOCAB = 256
PAD, BOS, EOS = 0, 1, 2
TEXT_LOW, TEXT_HIGH = 3, 200  # ordinary "text" tokens are drawn from [3, 200)
IMAGE = 255  # image placeholder token (Mllama uses id VOCAB, see below)
VISION_START, VISION_END = 250, 251  # Qwen vision start/end, Gemma3 boi/eoi, InternVL <img>/</img>
FAKE_AROUND_IMAGE, GLOBAL_IMAGE = 252, 253  # Idefics3 / SmolVLM wrappers
NEWLINE = 254  # PaliGemma "\n" separating prefix and suffix
SPECIAL_IDS = (PAD, IMAGE, VISION_START, VISION_END, FAKE_AROUND_IMAGE, GLOBAL_IMAGE, VOCAB)

TEXT_LENS = (6, 4)  # text tokens after the image; sample 1 is shorter -> left padded

_TEXT: dict = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "tie_word_embeddings": False,
}
_VISION: dict = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


@dataclass
class TinyVLM:
    """A tiny model plus a matching batch of two samples (with images)."""

    name: str
    model: transformers.PreTrainedModel
    batch: dict[str, torch.Tensor]
    decoder_path: str
    ignore_ids: tuple[int, ...] = field(default=SPECIAL_IDS, repr=False)

    def labels(self) -> torch.Tensor:
        """``input_ids`` with padding and image-related positions set to -100."""
        ids = self.batch["input_ids"]
        labels = ids.clone()
        mask = self.batch["attention_mask"] == 0
        for tok in self.ignore_ids:
            mask |= ids == tok
        labels[mask] = -100
        return labels

    def generate_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model.generate`` (the batch itself)."""
        return dict(self.batch)


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=gen).tolist()


def _left_pad(seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def _prompts(
    image_blocks: Sequence[list[int]], gen: torch.Generator, bos: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[BOS] + image_block + text`` per sample, left padded."""
    head = [BOS] if bos else []
    return _left_pad([head + blk + _text(n, gen) for blk, n in zip(image_blocks, TEXT_LENS, strict=True)])


def _finish(
    name: str, model: transformers.PreTrainedModel, batch: dict[str, torch.Tensor], decoder_path: str
) -> TinyVLM:
    model = model.float().eval()
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = PAD, EOS, BOS
    gc.do_sample = False
    return TinyVLM(name=name, model=model, batch=batch, decoder_path=decoder_path)


# --------------------------------------------------------------------------- builders


def _llava(gen: torch.Generator) -> TinyVLM:
    # CLIP 16x16 image, patch 4 -> 16 patches (+CLS dropped by "default" strategy) -> 16 image tokens.
    vision = {"model_type": "clip_vision_model", **_VISION, "image_size": 16, "patch_size": 4}
    cfg = LlavaConfig(
        vision_config=vision,
        text_config={"model_type": "llama", **_TEXT},
        image_token_index=IMAGE,
        image_seq_length=16,
    )
    model = LlavaForConditionalGeneration(cfg)
    ids, mask = _prompts([[IMAGE] * 16] * 2, gen)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
    }
    return _finish("llava", model, batch, "model.language_model")


def _llava_next(gen: torch.Generator) -> TinyVLM:
    # Tiles of 16x16, patch 8 -> 2x2 features per tile.  Sample 0 is 32x16 (HxW, grid 2x1), sample 1 is
    # 16x32 (grid 1x2); each has base tile + 2 crops = 3 tiles.  Tokens = 4 (base) + rows * (cols + newline).
    vision = {"model_type": "clip_vision_model", **_VISION, "image_size": 16, "patch_size": 8}
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config={"model_type": "llama", **_TEXT},
        image_token_index=IMAGE,
        image_grid_pinpoints=[[16, 32], [32, 16]],
        image_seq_length=4,
    )
    model = LlavaNextForConditionalGeneration(cfg)
    n_tokens = (4 + 4 * (2 + 1), 4 + 2 * (4 + 1))
    ids, mask = _prompts([[IMAGE] * n for n in n_tokens], gen)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(2, 3, 3, 16, 16, generator=gen),
        "image_sizes": torch.tensor([[32, 16], [16, 32]]),
    }
    return _finish("llava_next", model, batch, "model.language_model")


def _qwen_batch(
    gen: torch.Generator, patch: int, grids: Sequence[tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """Qwen-VL family: flattened patches, image_grid_thw and mm_token_type_ids (merge size 2)."""
    blocks = [[VISION_START] + [IMAGE] * (h * w // 4) + [VISION_END] for h, w in grids]
    ids, mask = _prompts(blocks, gen)
    n_patches = sum(h * w for h, w in grids)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(n_patches, 3 * 2 * patch * patch, generator=gen),
        "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids]),
        "mm_token_type_ids": (ids == IMAGE).int(),
    }


_QWEN_IDS = {
    "image_token_id": IMAGE,
    "video_token_id": 249,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}
_QWEN_GRIDS = ((4, 6), (4, 4))  # patch grids (h, w) -> 6 and 4 image tokens after 2x2 merge


def _qwen2_vl(gen: torch.Generator) -> TinyVLM:
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2, "patch_size": 4}
    text = {
        **_TEXT,
        "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
    }
    cfg = Qwen2VLConfig(vision_config=vision, text_config=text, **_QWEN_IDS)
    model = Qwen2VLForConditionalGeneration(cfg)
    return _finish("qwen2_vl", model, _qwen_batch(gen, 4, _QWEN_GRIDS), "model.language_model")


def _qwen2_5_vl(gen: torch.Generator) -> TinyVLM:
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 4,
        "out_hidden_size": 64,
        "window_size": 16,
        "fullatt_block_indexes": [1],
    }
    text = {
        **_TEXT,
        "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
    }
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_QWEN_IDS)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    return _finish("qwen2_5_vl", model, _qwen_batch(gen, 4, _QWEN_GRIDS), "model.language_model")


def _qwen3_vl(gen: torch.Generator) -> TinyVLM:
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 4,
        "out_hidden_size": 64,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0],
    }
    text = {
        **_TEXT,
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
            "rope_theta": 10000.0,
        },
    }
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, **_QWEN_IDS)
    model = Qwen3VLForConditionalGeneration(cfg)
    return _finish("qwen3_vl", model, _qwen_batch(gen, 4, _QWEN_GRIDS), "model.language_model")


def _idefics_like(name: str, config_cls: type, model_cls: type, gen: torch.Generator) -> TinyVLM:
    # 32x32 image, patch 8 -> 16 patches, pixel-shuffle scale 2 -> 4 image tokens per image.
    vision = {**_VISION, "image_size": 32, "patch_size": 8}
    cfg = config_cls(
        vision_config=vision,
        text_config={"model_type": "llama", **_TEXT},
        image_token_id=IMAGE,
        scale_factor=2,
        pad_token_id=PAD,
    )
    model = model_cls(cfg)
    block = [FAKE_AROUND_IMAGE, GLOBAL_IMAGE] + [IMAGE] * 4 + [FAKE_AROUND_IMAGE]
    ids, mask = _prompts([block, block], gen)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=gen),
        "pixel_attention_mask": torch.ones(2, 1, 32, 32, dtype=torch.bool),
    }
    return _finish(name, model, batch, "model.text_model")


def _paligemma(gen: torch.Generator) -> TinyVLM:
    # SigLIP 16x16, patch 4 -> 16 image tokens.  Layout: <image>*16 BOS prefix "\n" suffix;
    # token_type_ids 0 on the (bidirectional) prefix, 1 on the causal suffix.
    vision = {
        "model_type": "siglip_vision_model",
        **_VISION,
        "image_size": 16,
        "patch_size": 4,
        "vision_use_head": False,
    }
    text = {"model_type": "gemma", **_TEXT, "head_dim": 16}
    cfg = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE,
        vocab_size=VOCAB,
        projection_dim=64,
        hidden_size=64,
        tie_word_embeddings=False,
    )
    model = PaliGemmaForConditionalGeneration(cfg)
    seqs, types = [], []
    for n in TEXT_LENS:
        prefix = [IMAGE] * 16 + [BOS] + _text(2, gen) + [NEWLINE]
        seqs.append(prefix + _text(n, gen))
        types.append([0] * len(prefix) + [1] * n)
    ids, mask = _left_pad(seqs)
    token_type_ids, _ = _left_pad(types)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": token_type_ids,
        "pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
    }
    return _finish("paligemma", model, batch, "model.language_model")


def _gemma3(gen: torch.Generator) -> TinyVLM:
    # SigLIP 16x16, patch 4 -> 4x4 patches, avg-pooled to mm_tokens_per_image = 4 image tokens.
    vision = {
        "model_type": "siglip_vision_model",
        **_VISION,
        "image_size": 16,
        "patch_size": 4,
        "vision_use_head": False,
    }
    text = {
        **_TEXT,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    cfg = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=4,
        boi_token_index=VISION_START,
        eoi_token_index=VISION_END,
        image_token_index=IMAGE,
        tie_word_embeddings=False,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    # The projector weight is zero-initialised upstream, which would make the output ignore the image.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    block = [VISION_START] + [IMAGE] * 4 + [VISION_END]
    ids, mask = _prompts([block, block], gen)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": (ids == IMAGE).long(),
        "pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
    }
    return _finish("gemma3", model, batch, "model.language_model")


def _mllama(gen: torch.Generator) -> TinyVLM:
    # One image of one 16x16 tile per sample (patch 4 -> 17 vision tokens incl. CLS).  The text model has
    # a self-attention layer (0) and a cross-attention layer (1).  The image token id is VOCAB (outside
    # the LM head vocabulary, inside the embedding table of size VOCAB + 8), as in the real model.
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
        "max_num_tiles": 1,
        "supported_aspect_ratios": [[1, 1]],
        "intermediate_layers_indices": [0],
        "vision_output_dim": 64,
    }
    text = {k: v for k, v in _TEXT.items() if k != "max_position_embeddings"}
    text["cross_attention_layers"] = [1]
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB)
    model = MllamaForConditionalGeneration(cfg)
    # All tanh gates (cross-attention, tile/position embeddings) are zero-initialised upstream, which would
    # make the text output ignore the image; open them.
    for pname, param in model.named_parameters():
        if pname.endswith("gate"):
            torch.nn.init.constant_(param, 1.0)
    ids, mask = _prompts([[VOCAB, BOS], [VOCAB, BOS]], gen, bos=False)  # "<|image|><|begin_of_text|>..."
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(2, 1, 1, 3, 16, 16, generator=gen),
        "aspect_ratio_ids": torch.ones(2, 1, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(2, 1, 1, dtype=torch.long),
        # every real token (the image token and all text after it) attends to the single tile
        "cross_attention_mask": mask[:, :, None, None].clone(),
    }
    return _finish("mllama", model, batch, "model.language_model")


def _internvl(gen: torch.Generator) -> TinyVLM:
    # InternViT 16x16, patch 4 -> 16 patches (+CLS dropped), pixel shuffle 0.5 -> 4 image tokens.
    vision = {**_VISION, "image_size": 16, "patch_size": 4}
    text = {"model_type": "qwen2", **_TEXT}
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        image_seq_length=4,
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(cfg)
    block = [VISION_START] + [IMAGE] * 4 + [VISION_END]
    ids, mask = _prompts([block, block], gen)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
    }
    return _finish("internvl", model, batch, "model.language_model")


def _llama(gen: torch.Generator) -> TinyVLM:
    model = LlamaForCausalLM(LlamaConfig(**_TEXT))
    ids, mask = _prompts([[], []], gen)
    return _finish("llama", model, {"input_ids": ids, "attention_mask": mask}, "model")


_BUILDERS: dict[str, Callable[[torch.Generator], TinyVLM]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "idefics3": lambda g: _idefics_like("idefics3", Idefics3Config, Idefics3ForConditionalGeneration, g),
    "smolvlm": lambda g: _idefics_like("smolvlm", SmolVLMConfig, SmolVLMForConditionalGeneration, g),
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "mllama": _mllama,
    "internvl": _internvl,
    "llama": _llama,
}


def build_tiny_vlm(name: str, seed: int = 0) -> TinyVLM:
    """Build the tiny model ``name`` (one of :data:`ARCHITECTURES`) and its batch, deterministically."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {ARCHITECTURES}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vlm = _BUILDERS[name](gen)
    # inputs this transformers' model does not name yet (Qwen-VL's mm_token_type_ids came in 5.x)
    accepted = inspect.signature(vlm.model.forward).parameters
    vlm.batch = {key: value for key, value in vlm.batch.items() if key in accepted}
    return vlm
