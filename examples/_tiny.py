"""Tiny random stand-ins for the examples' real models, data and processors (the `--tiny` runs).

`--tiny` must run the real example's code path end to end, offline, on a CPU, in seconds: the same
loaders, collator, trainer and evaluation, only with a model built from config at toy widths and
data written on the fly. So the stand-ins are stock transformers classes of the same architecture
(`LlavaForConditionalGeneration`, `Qwen2VLForConditionalGeneration`) with real processors whose
chat templates follow the real models' prompt formats (Vicuna's ``USER: ... ASSISTANT:`` for
LLaVA-1.5, ChatML with vision tokens for Qwen2-VL). Their tokenizers are byte-level BPEs trained in
a few milliseconds on the synthetic data's own text, so every string round-trips exactly, as with
the real tokenizers.

The data are coloured shapes drawn with PIL and saved as PNG files: the task's question and answer
depend on the image, so the run exercises real image loading and the vision tower.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from cmoe_adapters._compat import pil_image_processor_class  # renamed within transformers 5.x

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
IMAGE_PIXELS = 48  # side of the PNG files; the processors resize them to their own inputs
# What a task asks: a colour by letter (ScienceQA-like), a colour (VQA-like), a shape (ImageNet-like)
# or the shape's box (Grounding-like).
TASK_KINDS = ("choice", "color", "shape", "box")

# --------------------------------------------------------------------------- synthetic data

_SINGLE_WORD = "Answer the question using a single word or phrase."
_LETTER = "Answer with the option's letter from the given choices directly."
_REGION = "Please provide the bounding box coordinate of the region this sentence describes:"


def draw_shape(color: str, shape: str, seed: int) -> tuple[Image.Image, tuple[float, ...]]:
    """A `color` `shape` at a random place and size on a light background, and its box (0-1)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (IMAGE_PIXELS, IMAGE_PIXELS), (235, 235, 235))
    size = rng.randint(18, 30)
    x, y = rng.randint(2, IMAGE_PIXELS - size - 2), rng.randint(2, IMAGE_PIXELS - size - 2)
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((x, y, x + size, y + size), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + size, y + size), fill=fill)
    else:
        draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    box = tuple(round(v / IMAGE_PIXELS, 2) for v in (x, y, x + size, y + size))
    return image, box


def _question_and_answer(
    task_kind: str, color: str, shape: str, box: tuple[float, ...], rng: random.Random
) -> tuple[str, str]:
    """A CoIN-style instruction about the image, and its answer."""
    if task_kind == "choice":  # ScienceQA-like: a multiple choice answered by letter
        options = [color, rng.choice([c for c in COLORS if c != color])]
        rng.shuffle(options)
        letter = "AB"[options.index(color)]
        return f"What is the color of the shape?\nA. {options[0]}\nB. {options[1]}\n{_LETTER}", letter
    if task_kind == "color":  # TextVQA/VQA-like: a short open answer
        return f"What color is the shape in the image?\n{_SINGLE_WORD}", color
    if task_kind == "box":  # Grounding-like (RefCOCO): the box of a described region
        question = f"{_REGION} {color} {shape}."
        return question, "[" + ", ".join(f"{v:.2f}" for v in box) + "]"
    return f"What is the object in the image?\n{_SINGLE_WORD}", shape  # ImageNet-like: a class name


def synthetic_records(task_kind: str, count: int, seed: int, image_dir: str, prefix: str) -> list[dict]:
    """`count` records ``{"image": <path relative to image_dir>, "question", "answer"}``, PNGs written."""
    if task_kind not in TASK_KINDS:
        raise ValueError(f"Unknown task kind {task_kind!r}; choose one of {TASK_KINDS}.")
    rng = random.Random(seed)
    os.makedirs(os.path.join(image_dir, prefix), exist_ok=True)
    records = []
    for index in range(count):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        relative = f"{prefix}/{index}.png"
        image, box = draw_shape(color, shape, seed * 10_000 + index)
        image.save(os.path.join(image_dir, relative))
        question, answer = _question_and_answer(task_kind, color, shape, box, rng)
        records.append({"image": relative, "question": question, "answer": answer})
    return records


def llava_conversation(record: dict, index: int) -> dict:
    """A record in LLaVA's training format (``conversations`` with ``<image>`` in the first turn)."""
    return {
        "id": str(index),
        "image": record["image"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{record['question']}"},
            {"from": "gpt", "value": record["answer"]},
        ],
    }


def coin_test_record(record: dict, index: int) -> dict:
    """A record in CoIN's test format (``question_id, image, text, answer``)."""
    return {
        "question_id": index,
        "image": record["image"],
        "text": record["question"],
        "answer": record["answer"],
    }


def write_json(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)


def corpus_of(records: Iterable[dict]) -> list[str]:
    """Every question and answer: what a tiny tokenizer is trained on."""
    return [text for record in records for text in (record["question"], record["answer"])]


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
