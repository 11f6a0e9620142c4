"""The demo's base model: a tiny LLaVA pretrained in ~1.5 minutes on easy-vqa's train images, cached.

Why pretrain at all: LoRA on a frozen *random* base cannot learn shape (random patch features
carry colour but not shape), and caption pretraining alone leaves nothing that compares a word of
the question with the image, which the yes/no tasks need. Two stages, on train images only (400
labelled train images are held out to report the end state):

1. vision only (cheap: the language model is not run): 2,000 steps of 64 images, horizontally
   flipped at random, classifying shape (and, with a small weight, colour, which is easy and
   otherwise crowds shape out) from the mean projected image token;
2. the whole model, 1,000 steps of 32: captions ("describe the image" -> "blue circle", 25%) and
   image-text matching (75%: "match blue circle" -> yes / no, yes/no balanced, negatives with the
   colour, the shape or both swapped; half of the prompts name one attribute only, "match blue" /
   "match circle"), with the classification kept as an auxiliary loss.

The classifiers' weights are the language model's (tied) embeddings of the colour and shape words,
so image tokens come to resemble the words that describe them and "is this word in the image?"
becomes a lookup that attention learns quickly. With separate linear heads the model found the
shape comparison but, depending on the seed, not the colour one (colour-swapped negatives at
0.0-0.7 after 1,000 steps; matching 0.47-0.89); with word-embedding heads, matching reached
0.90-0.97 on the seeds tried. The single-attribute prompts train each comparison the yes/no tasks
need on its own.

The result is a plain `LlavaForConditionalGeneration` + `LlavaProcessor`, saved with
`save_pretrained` under the cache directory (see `default_cache_root`) and written atomically, so
concurrent or interrupted runs never leave a half-written base.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from .collate import VQACollator, generate_answers
from .tasks import COLORS, SHAPES, image_labels, load_image
from .tiny_llava import NUM_IMAGE_TOKENS, build_tiny_llava

CACHE_NAME = "easyvqa-base-v1"  # stage 2 on cached pixels gives the same weights, bit for bit
METRICS_FILE = "pretrain_metrics.json"
CAPTION_PROMPT = "describe the image"
MATCH_PROMPT = "match"

VISION_STEPS = 2000
VISION_BATCH_SIZE = 64  # vision-only steps are overhead-bound: larger batches are nearly free
MIXED_STEPS = 1000
BATCH_SIZE = 32
HELD_OUT_IMAGES = 400
VISION_LR = 2e-3
MIXED_LR = 1e-3
VISION_COLOR_WEIGHT = 0.1  # colour is easy and crowds out shape early on; captions teach it anyway
AUX_WEIGHT = 2.0
MATCH_FRACTION = 0.75  # matching is the hard part: captions are learnt in a few hundred steps
PARTIAL_MATCH_FRACTION = 0.5  # of match prompts, those naming one attribute only
NEGATIVE_WEIGHTS = (0.4, 0.4, 0.2)  # colour, shape or both swapped; both is the easy case


def default_cache_root() -> Path:
    """Where cached bases live: ``$CMOE_ADAPTERS_CACHE``, else ``$XDG_CACHE_HOME/cmoe_adapters``,
    else ``~/.cache/cmoe_adapters`` (the conventions of ``HF_HOME`` / ``XDG_CACHE_HOME``)."""
    explicit = os.environ.get("CMOE_ADAPTERS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cmoe_adapters"


def _split_images(seed: int) -> tuple[list[int], list[int]]:
    """(pretraining ids, held-out ids) among the labelled train images."""
    ids = list(image_labels("train"))
    random.Random(f"pretrain-split/{seed}").shuffle(ids)
    return ids[HELD_OUT_IMAGES:], ids[:HELD_OUT_IMAGES]


def _pixels(processor: LlavaProcessor, image_ids: Sequence[int]) -> torch.Tensor:
    """Processed pixel values of train images, computed once (stage 1 indexes them every step)."""
    images = [load_image("train", i) for i in image_ids]
    process = processor.image_processor
    chunks = [
        process(images[k : k + 512], return_tensors="pt")["pixel_values"] for k in range(0, len(images), 512)
    ]
    return torch.cat(chunks)


def _hflip(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch: easy-vqa's shapes (upright triangles) are symmetric."""
    flip = torch.rand(pixels.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)


class _WordHeads:
    """Colour and shape classifiers whose weights are the language model's embeddings of the colour
    and shape words: logits = scale * mean image token @ embedding(word). Training them pulls image
    tokens towards the words that describe them (and those words' embeddings towards the images)."""

    def __init__(self, model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> None:
        self.embeddings = model.get_input_embeddings()
        to_ids = processor.tokenizer.convert_tokens_to_ids
        self.color_ids = torch.tensor(to_ids(list(COLORS)))
        self.shape_ids = torch.tensor(to_ids(list(SHAPES)))
        self.scale = nn.Parameter(torch.tensor(1.0))

    def loss(
        self, tokens: torch.Tensor, colors: torch.Tensor, shapes: torch.Tensor, color_weight: float = 1.0
    ) -> torch.Tensor:
        pooled = self.scale * tokens.reshape(colors.shape[0], NUM_IMAGE_TOKENS, -1).mean(1)
        words = self.embeddings.weight
        color = F.cross_entropy(pooled @ words[self.color_ids].T, colors)
        return color_weight * color + F.cross_entropy(pooled @ words[self.shape_ids].T, shapes)


def _match_record(
    image_id: int,
    rng: random.Random,
    partial: float = PARTIAL_MATCH_FRACTION,
    negative_weights: Sequence[float] = NEGATIVE_WEIGHTS,
    with_image: bool = True,
) -> dict:
    """ "match <colour> <shape>" -> yes / no; a negative swaps the colour, the shape or both.

    A fraction `partial` names one attribute only ("match blue", "match circle"): the single
    comparisons the yes/no tasks need, without the conjunction.
    """
    color, shape = image_labels("train")[image_id]
    form = rng.choice(("color", "shape")) if rng.random() < partial else "both"
    answer = "yes" if rng.random() < 0.5 else "no"
    if answer == "no":
        swap = form if form != "both" else rng.choices(("color", "shape", "both"), negative_weights)[0]
        if swap in ("color", "both"):
            color = rng.choice([c for c in COLORS if c != color])
        if swap in ("shape", "both"):
            shape = rng.choice([s for s in SHAPES if s != shape])
    words = {"color": color, "shape": shape, "both": f"{color} {shape}"}[form]
    image = load_image("train", image_id) if with_image else None
    return {"image": image, "question": f"{MATCH_PROMPT} {words}", "answer": answer}


def _caption_record(image_id: int, with_image: bool = True) -> dict:
    color, shape = image_labels("train")[image_id]
    image = load_image("train", image_id) if with_image else None
    return {"image": image, "question": CAPTION_PROMPT, "answer": f"{color} {shape}"}


def _schedule(step: int, total: int, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _labels_of(image_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    labels = image_labels("train")
    colors = torch.tensor([COLORS.index(labels[i][0]) for i in image_ids])
    shapes = torch.tensor([SHAPES.index(labels[i][1]) for i in image_ids])
    return colors, shapes


def _batches(ids: list[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless epochs of shuffled `ids` in batches."""
    while True:
        order = ids[:]
        rng.shuffle(order)
        for k in range(0, len(order) - batch_size + 1, batch_size):
            yield order[k : k + batch_size]


def evaluate_base(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, image_ids: Sequence[int], seed: int = 0
) -> dict[str, float]:
    """Greedy-generation accuracy on `image_ids` (train images kept out of pretraining): caption
    colour, caption shape, and matching (one "match <colour> <shape>" per image, yes/no balanced,
    negatives with the colour, the shape or both swapped equally often)."""
    collator = VQACollator(processor)
    captions = generate_answers(model, collator, [_caption_record(i) for i in image_ids])
    labels = image_labels("train")
    color = sum(c.split()[:1] == [labels[i][0]] for c, i in zip(captions, image_ids, strict=True))
    shape = sum(c.split()[1:2] == [labels[i][1]] for c, i in zip(captions, image_ids, strict=True))
    rng = random.Random(f"pretrain-eval/{seed}")
    matches = [_match_record(i, rng, partial=0.0, negative_weights=(1, 1, 1)) for i in image_ids]
    said = generate_answers(model, collator, matches)
    match = sum(s == r["answer"] for s, r in zip(said, matches, strict=True))
    n = len(image_ids)
    return {"color": color / n, "shape": shape / n, "matching": match / n}


def _step(
    loss: torch.Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler
) -> None:
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _train_vision(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    pixels: torch.Tensor,
    labels: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch_size: int,
    rng: random.Random,
    gen: torch.Generator,
    bar: tqdm,
) -> None:
    """Stage 1: vision tower, projector and the word embeddings learn shape (and a little colour)."""
    colors, shapes = labels
    heads = _WordHeads(model, processor)
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        *model.get_input_embeddings().parameters(),
        heads.scale,
    ]
    opt = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps))
    batches = _batches(list(range(len(pixels))), batch_size, rng)
    for _ in range(steps):
        idx = torch.tensor(next(batches))
        tokens = model.model.get_image_features(pixel_values=_hflip(pixels[idx], gen)).pooler_output
        loss = heads.loss(torch.stack(tokens), colors[idx], shapes[idx], VISION_COLOR_WEIGHT)
        _step(loss, opt, sched)
        bar.update()
        bar.set_postfix(stage="vision", loss=f"{loss.item():.3f}", refresh=False)


def _train_mixed(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    image_ids: list[int],
    pixels: torch.Tensor,
    labels: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch_size: int,
    rng: random.Random,
    bar: tqdm,
) -> None:
    """Stage 2: the whole model on captions + image-text matching, plus the word-alignment loss.

    Images come from `pixels` (stage 1's processed images, in `image_ids` order), mirrored per
    record: decoding and processing 32 PNGs per step would cost ~15% of the step.
    """
    colors, shapes = labels
    collator = VQACollator(processor)
    align = _WordHeads(model, processor)  # scale fixed at 1 here
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    opt = torch.optim.AdamW(model.parameters(), lr=MIXED_LR, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps))
    batches = _batches(image_ids, batch_size, rng)
    for _ in range(steps):
        ids = next(batches)
        records = [
            _match_record(i, rng, with_image=False)
            if rng.random() < MATCH_FRACTION
            else _caption_record(i, with_image=False)
            for i in ids
        ]
        idx = torch.tensor([position[i] for i in ids])
        flip = torch.tensor([rng.random() < 0.5 for _ in records])
        batch_pixels = torch.where(flip[:, None, None, None], pixels[idx].flip(-1), pixels[idx])
        out = model(**collator(records, pixel_values=batch_pixels))
        loss = out.loss + AUX_WEIGHT * align.loss(out.image_hidden_states, colors[idx], shapes[idx])
        _step(loss, opt, sched)
        bar.update()
        bar.set_postfix(stage="caption+match", loss=f"{loss.item():.3f}", refresh=False)


def pretrain(
    seed: int = 0,
    progress: bool = True,
    vision_steps: int = VISION_STEPS,
    mixed_steps: int = MIXED_STEPS,
    batch_size: int = BATCH_SIZE,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, dict[str, float]]:
    """Build and pretrain the tiny LLaVA (no caching). Also returns the held-out accuracies
    (``color``, ``shape``, ``matching``) and wall-clock seconds (``vision_seconds``,
    ``mixed_seconds``, ``seconds``). `batch_size` is that of stage 2."""
    start = time.perf_counter()
    model, processor = build_tiny_llava(seed)
    train_ids, held_out = _split_images(seed)
    rng = random.Random(f"pretrain/{seed}")
    gen = torch.Generator().manual_seed(seed)
    labels = _labels_of(train_ids)

    model.train()
    with tqdm(total=vision_steps + mixed_steps, desc="pretraining tiny LLaVA", disable=not progress) as bar:
        pixels = _pixels(processor, train_ids)
        _train_vision(model, processor, pixels, labels, vision_steps, VISION_BATCH_SIZE, rng, gen, bar)
        vision_done = time.perf_counter()
        _train_mixed(model, processor, train_ids, pixels, labels, mixed_steps, batch_size, rng, bar)
    mixed_done = time.perf_counter()

    model.eval()
    metrics: dict[str, float] = evaluate_base(model, processor, held_out, seed)
    metrics["vision_seconds"] = round(vision_done - start, 1)
    metrics["mixed_seconds"] = round(mixed_done - vision_done, 1)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    return model, processor, metrics


def _load(path: Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    model = LlavaForConditionalGeneration.from_pretrained(path)
    return model.eval(), LlavaProcessor.from_pretrained(path)


def pretrained_base(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, progress: bool = True
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The pretrained tiny LLaVA and its processor, from ``<cache_dir>/easyvqa-base-v1-seed<seed>``.

    `cache_dir` defaults to `default_cache_root()`. On a miss the base is pretrained (~1.5 min on
    two idle cores), saved into a temporary directory beside the target and moved into place with
    one `os.replace`; if another process got there first, its copy is kept. The held-out accuracies
    are printed (when `progress`) and kept in ``pretrain_metrics.json`` next to the weights.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    path = root / f"{CACHE_NAME}-seed{seed}"
    if (path / METRICS_FILE).is_file():
        return _load(path)

    model, processor, metrics = pretrain(seed=seed, progress=progress)
    if progress:
        print(
            f"tiny LLaVA base pretrained in {metrics['seconds']:.0f} s; held-out accuracy: colour "
            f"{metrics['color']:.3f}, shape {metrics['shape']:.3f}, matching {metrics['matching']:.3f}"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")  # written last: the marker
        try:
            os.replace(tmp, path)
        except OSError as err:
            if not (path / METRICS_FILE).is_file():  # not a lost race: something else is in the way
                raise OSError(f"Cannot put the pretrained base at {path}; remove what is there.") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, processor
