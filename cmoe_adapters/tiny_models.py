"""Tiny random stand-ins of real vision-language architectures, for offline checks (`--tiny`).

A recipe or an example names a real model of several GB; ``--tiny`` runs its exact code path
(loaders, collator, trainer, evaluation) on a CPU in seconds, so the stand-in must be the same
transformers class with a real processor whose chat template follows the real model's prompt
format (Vicuna's ``USER: ... ASSISTANT:`` for LLaVA-1.5, ChatML with vision tokens for Qwen2-VL),
only at toy widths and with random weights. Tokenizers are byte-level BPEs trained in milliseconds
on the run's own text, so every string round-trips exactly, as with the real tokenizers, and
nothing is downloaded.

`build_tiny_model(model_class, corpus)` picks the stand-in by the real model's class name
(`TINY_MODELS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from ._compat import pil_image_processor_class  # renamed within transformers 5.x

# --------------------------------------------------------------------------- tokenizers


def bpe_tokenizer(corpus: Iterable[str], special_tokens: Sequence[str], vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE trained on `corpus` (any text still encodes, byte by byte), specials first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    return tokenizer


def _finish_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    config = model.generation_config
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.do_sample = False


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --------------------------------------------------------------------------- LLaVA-1.5

LLAVA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# LLaVA-1.5's (Vicuna v1) prompt format: "USER: <image>\n{question} ASSISTANT: {answer}", the images
# of a turn before its text, as llava-hf's processors render it.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'].upper() + ': ' -}}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] + ' ' -}}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def tiny_llava(corpus: Iterable[str], seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random LLaVA (CLIP 32x32, patch 8 -> 16 image tokens; Llama 64 wide x 2) and its processor."""
    core = bpe_tokenizer([*corpus, "USER: ASSISTANT:"], LLAVA_SPECIALS)
    core.post_processor = processors.TemplateProcessing(  # Llama prepends <s>
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    image_size, patch_size = 32, 8
    image_processor = pil_image_processor_class(
        "CLIPImageProcessor"
    )(  # LLaVA-1.5's resize + centre crop, at toy size
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(lambda: LlavaForConditionalGeneration(config), seed)
    _finish_generation_config(model, tokenizer)
    return model, processor


# --------------------------------------------------------------------------- Qwen2-VL

QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# Qwen2-VL's ChatML format: a default system turn, each image as <|vision_start|><|image_pad|>
# <|vision_end|> where it stands in the turn, every turn closed by <|im_end|> and a newline.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """The stock `Qwen2VLProcessor` without a video processor, which transformers only builds with
    torchvision (not a dependency here). Images, text and the chat template take the stock code."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def tiny_qwen2_vl(
    corpus: Iterable[str], seed: int = 0
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A random Qwen2-VL (patch 4, 2x2 merge, 32x32 images -> 16 image tokens; text 64 wide x 2)."""
    core = bpe_tokenizer(
        [*corpus, "system\nYou are a helpful assistant.", "user\n", "assistant\n"], QWEN_SPECIALS
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        padding_side="left",
        model_max_length=512,
    )
    patch_size, merge_size, side = 4, 2, 32
    image_processor = pil_image_processor_class(
        "Qwen2VLImageProcessor"
    )(  # every image becomes 32x32 pixels: 8x8 patches
        size={"shortest_edge": side * side, "longest_edge": side * side},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=merge_size,
    )
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,  # the merger's output: the language model's width
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": patch_size,
            "spatial_merge_size": merge_size,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = _seeded(lambda: Qwen2VLForConditionalGeneration(config), seed)
    _finish_generation_config(model, tokenizer)
    return model, processor


TinyBuilder = Callable[[Iterable[str], int], tuple[PreTrainedModel, ProcessorMixin]]

# the real model's transformers class -> its tiny stand-in
TINY_MODELS: dict[str, TinyBuilder] = {
    "LlavaForConditionalGeneration": tiny_llava,
    "Qwen2VLForConditionalGeneration": tiny_qwen2_vl,
}


def build_tiny_model(
    model_class: str, corpus: Iterable[str], seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The tiny stand-in of `model_class` (a transformers class name), its tokenizer trained on `corpus`."""
    if model_class not in TINY_MODELS:
        raise ValueError(
            f"no tiny stand-in for model_class {model_class!r}: known are {', '.join(sorted(TINY_MODELS))} "
            "(a run file checked with --tiny names its model class; 'auto' cannot be resolved offline)."
        )
    return TINY_MODELS[model_class](corpus, seed)
