"""The continual stream of the CPU demo: four visual question answering tasks on the real easy-vqa data.

The `easy_vqa` package ships 4,000 train and 1,000 test 64x64 images (one coloured shape each) with
questions, so the demo runs offline. Its questions split cleanly by wording and answer type into
four tasks, learnt in `TASK_ORDER`:

- ``shape``: "what shape is in the image?" -> circle / rectangle / triangle
- ``color``: "what color is the shape?" -> one of eight colours
- ``shape_yesno``: "is there a triangle?" -> yes / no
- ``color_yesno``: "is there a red shape in the image?" -> yes / no

Two deliberate departures from the raw yes/no questions, both because a demo that must learn each
task in ~200 LoRA steps on two CPU cores should measure forgetting, not the limits of a tiny model:

- Negated templates ("is there not a ...", "does the image not contain ...", "is no ... present?")
  are dropped. They are half of the raw yes/no questions; a prototype learnt them no better than
  reading the wording alone (0.69 / 0.88 without looking at the image) on a CPU budget.
- Yes and no are balanced exactly (the raw colour yes/no questions are ~88% "no"), so a
  constant answer scores 0.5 and accuracy reflects looking at the image.

Images are decoded once per process and shared between records (they are only read).
"""

from __future__ import annotations

import functools
import random

from PIL import Image

TASK_ORDER: tuple[str, ...] = ("shape", "color", "shape_yesno", "color_yesno")
SPLITS: tuple[str, ...] = ("train", "test")
COLORS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")


def _is_negated(question: str) -> bool:
    words = question.rstrip("?").split()
    return "not" in words or words[:2] == ["is", "no"]


def _task_of(question: str, answer: str) -> str | None:
    """Which task a raw easy-vqa question belongs to (None: a negated yes/no question, dropped)."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if _is_negated(question):
        return None
    words = set(question.rstrip("?").split())
    return "shape_yesno" if words & set(SHAPES) else "color_yesno"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")


@functools.cache
def _questions(split: str) -> tuple[tuple[str, str, int], ...]:
    import easy_vqa

    texts, answers, ids = (
        easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    )()
    return tuple(zip(texts, answers, ids, strict=True))


@functools.cache
def _image_paths(split: str) -> dict[int, str]:
    import easy_vqa

    return (easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths)()


@functools.cache
def load_image(split: str, image_id: int) -> Image.Image:
    """The decoded RGB image `image_id` of `split`, cached: records share it, so never modify it."""
    _check_split(split)
    with Image.open(_image_paths(split)[image_id]) as im:
        return im.convert("RGB")


@functools.cache
def _by_task(split: str) -> dict[str, tuple[tuple[str, str, int], ...]]:
    out: dict[str, list[tuple[str, str, int]]] = {name: [] for name in TASK_ORDER}
    for question, answer, image_id in _questions(split):
        task = _task_of(question, answer)
        if task is not None:
            out[task].append((question, answer, image_id))
    return {name: tuple(rows) for name, rows in out.items()}


def _balanced_sample(rows: tuple, limit: int | None, rng: random.Random) -> list:
    """Equal numbers of "yes" and "no" rows (all of the rarer answer when `limit` is None)."""
    yes = [r for r in rows if r[1] == "yes"]
    no = [r for r in rows if r[1] == "no"]
    rng.shuffle(yes)
    rng.shuffle(no)
    per_answer = min(len(yes), len(no))
    n = 2 * per_answer if limit is None else min(limit, 2 * per_answer)
    picked = yes[: n // 2] + no[: n - n // 2]
    rng.shuffle(picked)
    return picked


def load_task(name: str, split: str, limit: int | None, seed: int = 0) -> list[dict]:
    """Records ``{"image", "question", "answer"}`` of task `name` from easy-vqa's `split`.

    `limit` records are drawn without replacement, deterministically from `seed` (all records when
    None or when fewer exist); yes/no tasks are balanced exactly (see the module docstring).
    """
    if name not in TASK_ORDER:
        raise ValueError(f"Unknown task {name!r}; valid tasks: {', '.join(TASK_ORDER)}.")
    _check_split(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}.")
    rows = _by_task(split)[name]
    rng = random.Random(f"{name}/{split}/{seed}")
    if name.endswith("_yesno"):
        picked = _balanced_sample(rows, limit, rng)
    else:
        picked = list(rows)
        rng.shuffle(picked)
        picked = picked[:limit]
    return [{"image": load_image(split, i), "question": q, "answer": a} for q, a, i in picked]


@functools.cache
def image_labels(split: str) -> dict[int, tuple[str, str]]:
    """``{image_id: (colour, shape)}`` for the images whose questions reveal both (~93% of them).

    easy-vqa ships no label file; pretraining needs the labels, so they are read back from the
    questions whose answer or true statement names the colour or the shape.
    """
    _check_split(split)
    colors: dict[int, str] = {}
    shapes: dict[int, str] = {}
    for question, answer, image_id in _questions(split):
        words = question.rstrip("?").split()
        named: list[str] = []
        if answer in COLORS or answer in SHAPES:
            named = [*words, answer]  # "what color is the circle?" -> blue names both
        elif (answer == "yes") != _is_negated(question):
            named = words  # a true statement: "is there a red shape?" -> yes
        for word in named:
            if word in COLORS:
                colors[image_id] = word
            elif word in SHAPES:
                shapes[image_id] = word
    return {i: (colors[i], shapes[i]) for i in sorted(colors.keys() & shapes.keys())}
