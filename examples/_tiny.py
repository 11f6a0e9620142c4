"""Synthetic data for the examples' `--tiny` runs, and the tiny models they train.

`--tiny` must run the real example's code path end to end, offline, on a CPU, in seconds: the same
loaders, collator, trainer and evaluation, only with a model built from config at toy widths
(`cmoe_adapters.tiny_models`: stock transformers classes of the same architecture with real
processors) and data written on the fly.

The data are coloured shapes drawn with PIL and saved as PNG files: the task's question and answer
depend on the image, so the run exercises real image loading and the vision tower.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable

from PIL import Image, ImageDraw

from cmoe_adapters.tiny_models import tiny_llava, tiny_qwen2_vl

__all__ = ["tiny_llava", "tiny_qwen2_vl"]  # the examples build their models through this module

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
