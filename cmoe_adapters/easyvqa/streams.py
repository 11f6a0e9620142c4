"""Two kinds of task stream that test the task locator, and inputs of tasks never learnt.

* **Same question, different images** (`image_kind_records`): every task asks "what is in the
  image?", about its own kind of image -- drawn digits on a tinted ground (-> the digit), flat
  noisy colour patches (-> the colour), black-and-white stripes (-> ``horizontal`` /
  ``vertical``), easy-vqa's shapes (-> the shape). Only the image tells the tasks apart.
* **Near-duplicate wording, same images** (`near_duplicate_stream`): one yes/no task per colour
  and per shape of easy-vqa ("is there a red shape?", "is there a blue shape?", ...,
  "is there a circle?"), all on the same kind of image. Only one word tells the tasks apart.

Each stream also has *unknown* inputs (`unknown_inputs`): inputs of tasks the stream never
learns, to measure the locator's open-set decision. Everything is drawn from a seed or read from
the shipped easy-vqa data, so nothing is downloaded.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

import torch
from PIL import Image, ImageDraw, ImageFont

from .tasks import COLORS, SHAPES, load_task
from .tiny_llava import IMAGE_SIZE

QUESTION = "what is in the image?"
DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical")
# the words a tokenizer needs beyond the demo's (`build_tiny_llava(extra_words=STREAM_WORDS)`)
STREAM_WORDS: tuple[str, ...] = (*DIGITS, *ORIENTATIONS, "checkered")

_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (130, 80, 30),
    "yellow": (235, 215, 40),
}
IMAGE_KINDS: tuple[str, ...] = ("digits", "patches", "stripes", "shapes")


@functools.cache
def glyph_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled font at `size` pixels (nothing to download), loaded once per size."""
    return ImageFont.load_default(size=size)


def _digit(rng: random.Random) -> tuple[Image.Image, str]:
    """A digit glyph of random size and place, in a dark ink on a random light tint."""
    label = rng.randrange(10)
    ground = tuple(rng.randint(150, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), ground)
    size = rng.randint(30, 48)
    x, y = rng.randint(4, 64 - size // 2 - 8), rng.randint(-8, 64 - size)
    ImageDraw.Draw(image).text((x, y), str(label), fill=ink, font=glyph_font(size))
    return image, DIGITS[label]


# Not gray: a flat gray patch is the average of the black-and-white stripes, and the 2-layer vision
# tower of the tiny LLaVA cannot tell the two apart (a linear probe on its features: 98.7%).
PATCH_COLORS: tuple[str, ...] = tuple(c for c in COLORS if c != "gray")


def _patch(rng: random.Random) -> tuple[Image.Image, str]:
    """One flat colour (not gray, see `PATCH_COLORS`) with per-pixel noise."""
    color = rng.choice(PATCH_COLORS)
    noise = torch.Generator().manual_seed(rng.getrandbits(63))
    pixels = torch.tensor(_RGB[color]) + torch.randint(-25, 26, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=noise)
    return Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()), color


def _stripes(rng: random.Random) -> tuple[Image.Image, str]:
    """Black and white stripes of random period and phase."""
    orientation = rng.choice(ORIENTATIONS)
    period, phase = rng.randint(6, 16), rng.randrange(16)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for start in range(-phase, IMAGE_SIZE, period):
        box = (start, 0, start + period // 2 - 1, IMAGE_SIZE) if orientation == "vertical" else None
        box = box or (0, start, IMAGE_SIZE, start + period // 2 - 1)
        draw.rectangle(box, fill=(0, 0, 0))
    return image, orientation


def _checkers(rng: random.Random) -> tuple[Image.Image, str]:
    """A two-colour checkerboard (an image kind no stream learns)."""
    first, second = rng.sample(list(_RGB.values()), 2)
    cell = rng.randint(6, 16)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), first)
    draw = ImageDraw.Draw(image)
    for row in range(0, IMAGE_SIZE, cell):
        for column in range(0, IMAGE_SIZE, cell):
            if (row // cell + column // cell) % 2:
                draw.rectangle((column, row, column + cell - 1, row + cell - 1), fill=second)
    return image, "checkered"


_DRAWN: dict[str, Callable[[random.Random], tuple[Image.Image, str]]] = {
    "digits": _digit,
    "patches": _patch,
    "stripes": _stripes,
    "checkers": _checkers,
}


def _split_seed(split: str, seed: int) -> int:
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}; valid splits: train, test.")
    return seed * 2 + (split == "test")


def image_kind_records(kind: str, split: str, count: int, seed: int = 0) -> list[dict]:
    """`count` records ``{"image", "question", "answer"}`` asking `QUESTION` about images of `kind`."""
    if kind == "shapes":  # easy-vqa's real images, asked the stream's one question
        return [{**r, "question": QUESTION} for r in load_task("shape", split, count, seed=seed)]
    if kind not in _DRAWN:
        raise ValueError(
            f"Unknown image kind {kind!r}; valid kinds: {', '.join((*IMAGE_KINDS, 'checkers'))}."
        )
    rng = random.Random(f"{kind}/{_split_seed(split, seed)}")
    records = []
    for _ in range(count):
        image, answer = _DRAWN[kind](rng)
        records.append({"image": image, "question": QUESTION, "answer": answer})
    return records


SAME_QUESTION_TASKS: tuple[str, ...] = ("digits", "patches", "stripes")


NEAR_DUPLICATE_TASKS: tuple[str, ...] = tuple(f"is_{c}" for c in COLORS) + tuple(f"is_{s}" for s in SHAPES)


def near_duplicate_records(task: str, split: str, count: int, seed: int = 0) -> list[dict]:
    """Balanced yes/no records of `task` (``is_<colour>`` or ``is_<shape>``) from easy-vqa's questions."""
    if task not in NEAR_DUPLICATE_TASKS:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {', '.join(NEAR_DUPLICATE_TASKS)}.")
    word = task.removeprefix("is_")
    source = "color_yesno" if word in COLORS else "shape_yesno"
    rows = [r for r in load_task(source, split, None, seed=seed) if word in r["question"].rstrip("?").split()]
    yes = [r for r in rows if r["answer"] == "yes"]
    no = [r for r in rows if r["answer"] == "no"]
    per_answer = min(len(yes), len(no), count // 2 + count % 2)
    picked = yes[:per_answer] + no[:per_answer]
    random.Random(f"{task}/{split}/{seed}").shuffle(picked)
    return picked[:count]


def unknown_inputs(stream: str, split: str, count: int, seed: int = 0) -> dict[str, list[dict]]:
    """Inputs of tasks a stream never learns, by kind, to measure the open-set decision.

    ``"same_question"`` (learnt: `SAME_QUESTION_TASKS`): the same question about an image kind it
    never saw (checkerboards, easy-vqa shapes), and another question about a learnt kind.
    ``"near_duplicate"`` (learnt: the ``is_<colour>`` / ``is_<shape>`` tasks): easy-vqa's
    "what shape / what color" questions on the same images.
    """
    if stream == "same_question":
        patches = image_kind_records("patches", split, count, seed=seed)
        return {
            "checkers": image_kind_records("checkers", split, count, seed=seed),
            "shapes": image_kind_records("shapes", split, count, seed=seed),
            "patches_other_question": [{**r, "question": "what color is the image?"} for r in patches],
        }
    if stream == "near_duplicate":
        return {
            "what_shape": load_task("shape", split, count, seed=seed),
            "what_color": load_task("color", split, count, seed=seed),
        }
    raise ValueError(f"Unknown stream {stream!r}; valid streams: same_question, near_duplicate.")
