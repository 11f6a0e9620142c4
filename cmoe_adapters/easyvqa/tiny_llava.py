"""A tiny LLaVA (~1.2M parameters) built from config, with a real word-level `LlavaProcessor`.

The demo must run offline on two CPU cores, so nothing is downloaded: the model is a stock
`LlavaForConditionalGeneration` (CLIP-style vision tower, Llama-style language model) at toy
widths, and the tokenizer is a `tokenizers` WordLevel model over the ~40 words the demo uses. Being
stock transformers classes, model and processor save, reload and generate like any LLaVA, and the
adapters are exercised on the real architecture.

Image tokens: LLaVA's config has no patch merge (its projector maps each vision token to one
language token), so the 2x2 merge of 8-pixel patches a prototype used is not available natively.
The choice is between patch 8 (64 image tokens) and patch 16 (16 image tokens). Measured on two
cores, batch 32, a peft LoRA training step takes 170 ms with patch 8 and 63 ms with patch 16 (the
language model dominates and attends over 4x more positions). Patch 16 learns shape more slowly
(a 2-layer ViT from scratch sits on a plateau for ~500 steps), but vision-only steps are cheap, so
`pretrain` simply gives the vision tower enough of them (held-out shape 0.98 after 2,000 steps of
64 images). Patch 16 is used: 64x64 images, 4x4 = 16 image tokens (CLIP's CLS token is dropped by
the "default" feature strategy).

Word embeddings are tied (input = output): pretraining aligns image tokens with the embeddings of
the words that describe them, and tying puts the captioning head in that same space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .._compat import pil_image_processor_class
from .tasks import COLORS, SHAPES

IMAGE_SIZE = 64
PATCH_SIZE = 16


def image_tokens(patch_size: int = PATCH_SIZE) -> int:
    """Image tokens per 64x64 image (LLaVA's projector maps each patch to one token)."""
    return (IMAGE_SIZE // patch_size) ** 2


NUM_IMAGE_TOKENS = image_tokens()
_TEXT_POSITIONS = 240  # room for the prompt and answer beside the image tokens (256 positions at patch 16)


def _max_length(patch_size: int) -> int:
    return _TEXT_POSITIONS + image_tokens(patch_size)


PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)

# Every word of easy-vqa's questions and answers, of the pretraining prompts and of the chat template.
_QUESTION_WORDS = (
    "?", "a", "color", "contain", "does", "image", "in", "is", "no", "not", "of", "present", "shape",
    "the", "there", "what", "yes",
)  # fmt: skip
_PRETRAIN_WORDS = ("describe", "match")
_CHAT_WORDS = ("user", "assistant", ":")
WORDS: tuple[str, ...] = tuple(sorted({*_QUESTION_WORDS, *COLORS, *SHAPES, *_PRETRAIN_WORDS, *_CHAT_WORDS}))

# One user turn (image, then text) and one assistant turn; "assistant :" opens the answer.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'user :' -}}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- ' <image>' -}}{%- else -%}{{- ' ' + item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- ' ' -}}"
    "{%- else -%}{{- 'assistant :' -}}"
    "{%- for item in message['content'] -%}{{- ' ' + item['text'] -}}{%- endfor -%}{{- ' </s> ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant :' -}}{%- endif -%}"
)


def chat_prompt(question: str) -> str:
    """The chat-formatted prompt (with one `<image>`) that `CHAT_TEMPLATE` renders for `question`.

    Same text as ``processor.apply_chat_template(..., add_generation_prompt=True)``, without
    rendering Jinja for every sample of every batch.
    """
    return f"user : {IMAGE} {question} assistant :"


def build_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: lower-cased words and punctuation, `<s>` prepended, left padding.

    `extra_words` (appended after the demo's, in order) let other streams use their own answers.
    """
    words = (*WORDS, *(w for w in dict.fromkeys(extra_words) if w not in WORDS))
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "shape?" -> "shape", "?"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=256,
    )


def build_processor(extra_words: Sequence[str] = (), patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    """`LlavaProcessor` = CLIP-style 64x64 image processor + word-level tokenizer + chat template."""
    clip_pil = pil_image_processor_class("CLIPImageProcessor")  # torchvision is not a dependency
    image_processor = clip_pil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
    )
    tokenizer = build_tokenizer(extra_words)
    tokenizer.model_max_length = _max_length(patch_size)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, patch_size: int = PATCH_SIZE) -> LlavaConfig:
    """Config of the tiny LLaVA: vision 64 wide x 2 layers, language 128 wide x 4 layers."""
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=_max_length(patch_size),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,  # one vector per word, read and written (see the module docstring)
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=image_tokens(patch_size),
        vision_feature_layer=-1,  # the last layer: with only two, -2 would waste half the tower
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def build_tiny_llava(
    seed: int = 0, extra_words: Sequence[str] = (), patch_size: int = PATCH_SIZE
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA (seeded, without touching the global RNG) and its processor.

    `extra_words` extend the vocabulary (see `build_tokenizer`). `patch_size` 8 gives 64 image
    tokens instead of 16 (benchmarks only: the demo, its collator and its shipped base use 16).
    """
    processor = build_processor(extra_words, patch_size)
    tokenizer = processor.tokenizer
    config = build_config(tokenizer, patch_size)
    with torch.random.fork_rng(devices=[]):  # the model is built on the CPU
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    gen.do_sample = False
    gen.max_new_tokens = 4
    return model.eval(), processor
