"""A tiny vision tower pretrained on image kinds that no stream uses, for the locator benchmarks.

Real VLMs have a vision tower pretrained on far more images than any task stream shows it; the
tiny towers the tests build are random, or pretrained on easy-vqa alone. This gives a middle
ground that can be built offline: the tiny LLaVA's CLIP tower trained to tell apart seven synthetic
kinds of image (letters, gradients, colour noise, rings, dot grids, lines, lines of text). None
of them is a kind the same-question stream learns or holds out (digits, patches, stripes;
checkerboards, easy-vqa shapes).
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable

import torch
from PIL import Image, ImageDraw

from cmoe_adapters.easyvqa import build_tiny_llava
from cmoe_adapters.easyvqa.streams import STREAM_WORDS, glyph_font
from cmoe_adapters.easyvqa.tiny_llava import IMAGE_SIZE

Color = tuple[int, int, int]


def _color(rng: random.Random, low: int = 0, high: int = 255) -> Color:
    return (rng.randint(low, high), rng.randint(low, high), rng.randint(low, high))


def _canvas(rng: random.Random, low: int = 0) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _color(rng, low))
    return image, ImageDraw.Draw(image)


def letters(rng: random.Random) -> Image.Image:
    image, draw = _canvas(rng, low=150)
    size = rng.randint(24, 48)
    position = (rng.randint(0, 30), rng.randint(-8, 30))
    draw.text(position, chr(65 + rng.randrange(26)), fill=_color(rng, 0, 90), font=glyph_font(size))
    return image


def gradient(rng: random.Random) -> Image.Image:
    first, second = torch.tensor(_color(rng)).float(), torch.tensor(_color(rng)).float()
    angle = rng.uniform(0, math.pi)
    y, x = torch.meshgrid(torch.linspace(-1, 1, IMAGE_SIZE), torch.linspace(-1, 1, IMAGE_SIZE), indexing="ij")
    weight = ((x * math.cos(angle) + y * math.sin(angle) + 1.5) / 3).unsqueeze(-1)
    return Image.fromarray((first * (1 - weight) + second * weight).clamp(0, 255).byte().numpy())


def colour_noise(rng: random.Random) -> Image.Image:
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    pixels = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=generator)
    return Image.fromarray(pixels.byte().numpy())


def rings(rng: random.Random) -> Image.Image:
    image, draw = _canvas(rng)
    color, width = _color(rng), rng.randint(2, 6)
    x, y = rng.randint(10, 54), rng.randint(10, 54)
    for radius in range(width, 90, 2 * width):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=color, width=width)
    return image


def dot_grid(rng: random.Random) -> Image.Image:
    image, draw = _canvas(rng)
    color, step = _color(rng), rng.randint(6, 14)
    radius = rng.randint(1, step // 3)
    for y in range(step // 2, IMAGE_SIZE, step):
        for x in range(step // 2, IMAGE_SIZE, step):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    return image


def lines(rng: random.Random) -> Image.Image:
    image, draw = _canvas(rng)
    for _ in range(rng.randint(2, 6)):
        ends = tuple(rng.randint(-10, IMAGE_SIZE + 10) for _ in range(4))
        draw.line(ends, fill=_color(rng), width=rng.randint(1, 5))
    return image


def text_lines(rng: random.Random) -> Image.Image:
    image, draw = _canvas(rng, low=150)
    for row in range(rng.randint(2, 5)):
        word = "".join(chr(97 + rng.randrange(26)) for _ in range(rng.randint(3, 8)))
        draw.text((rng.randint(0, 8), 4 + 14 * row), word, fill=_color(rng, 0, 90), font=glyph_font(12))
    return image


OTHER_KINDS: dict[str, Callable[[random.Random], Image.Image]] = {
    "letters": letters,
    "gradient": gradient,
    "colour noise": colour_noise,
    "rings": rings,
    "dot grid": dot_grid,
    "lines": lines,
    "text lines": text_lines,
}


def pretrained_tower_llava(steps: int = 1500, batch_size: int = 64, seed: int = 0):
    """The random tiny LLaVA (seed 0) whose vision tower learnt to tell `OTHER_KINDS` apart.

    A linear head on the mean of the tower's last hidden states (the tokens the projector reads)
    is trained with the tower by cross-entropy over the kinds; the projector and the language
    model stay random, as in the random base. Returns the model, its processor and the last
    batch's accuracy.
    """
    model, processor = build_tiny_llava(seed=seed, extra_words=STREAM_WORDS)
    tower, kinds = model.model.vision_tower, list(OTHER_KINDS.values())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(tower.config.hidden_size, len(kinds))
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)
    rng = random.Random(f"other-kinds/{seed}")
    tower.train()
    accuracy = 0.0
    for step in range(steps):
        labels = [rng.randrange(len(kinds)) for _ in range(batch_size)]
        pixels = processor.image_processor([kinds[k](rng) for k in labels], return_tensors="pt")[
            "pixel_values"
        ]
        pooled = tower(pixels).last_hidden_state[:, 1:].mean(1)  # CLS dropped, as LLaVA's "default"
        logits = head(pooled)
        target = torch.tensor(labels)
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = float((logits.argmax(-1) == target).float().mean())
        if step % 500 == 0 or step == steps - 1:
            print(f"tower pretraining: step {step + 1}/{steps}, loss {loss.item():.3f}", file=sys.stderr)
    return model.eval(), processor, accuracy
