"""The demo's base model: a tiny LLaVA pretrained in ~2.5 minutes on easy-vqa's train images.

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

The result is a plain `LlavaForConditionalGeneration` + `LlavaProcessor`. The package ships one,
made by ``pretrain(seed=0)`` (`shipped_base`; its ``pretrain_metrics.json`` records how: versions,
schedule, seed, held-out accuracies), so the demo starts in seconds; `pretrained_base` makes one
here instead (``cmoe demo --pretrain-base``), saved with `save_pretrained` under the cache directory
(see `default_cache_root`) and written atomically, so concurrent or interrupted runs never leave a
half-written base. ``python -m cmoe_adapters.easyvqa DIR`` re-creates the shipped one (see `main`).

The image tokens the auxiliary losses need are taken from the projector's output with a forward
hook (`capture_projected_image_tokens`): what a LLaVA forward returns about its image features has
changed between transformers releases, the projector module has not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from .collate import VQACollator, generate_answers
from .tasks import COLORS, SHAPES, image_labels, load_image
from .tiny_llava import NUM_IMAGE_TOKENS, build_tiny_llava

CACHE_NAME = "easyvqa-base-v1"  # stage 2 on cached pixels gives the same weights, bit for bit
METRICS_FILE = "pretrain_metrics.json"  # written last: its presence marks a complete base
SHIPPED_BASE = Path(__file__).with_name("base")  # package data: made by `pretrain(seed=0)`
SHIPPED_SEED = 0
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


@dataclass(frozen=True)
class Schedule:
    """How much pretraining. The default makes the real base; `FAST_SCHEDULE` only runs the code."""

    vision_steps: int = VISION_STEPS
    mixed_steps: int = MIXED_STEPS
    batch_size: int = BATCH_SIZE  # of stage 2 (stage 1 uses VISION_BATCH_SIZE)
    images: int | None = None  # pretraining images; None: all (~3,100)
    held_out: int = HELD_OUT_IMAGES  # of the held-out images, how many are evaluated
    name: str = "default"  # in the cache directory's name, so no other schedule can pass for the base


# `cmoe demo --fast`: every step of pretraining, a few seconds, a base that knows nothing
FAST_SCHEDULE = Schedule(vision_steps=6, mixed_steps=4, images=128, held_out=24, name="fast")


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


@contextlib.contextmanager
def capture_projected_image_tokens(model: LlavaForConditionalGeneration) -> Iterator[list[torch.Tensor]]:
    """Inside, every forward of the LLaVA projector appends its output, ``[images, tokens, hidden]``,
    to the yielded list.

    Why a hook: where a forward's output keeps the projected image tokens, and what
    `get_image_features` returns, change between transformers releases (``image_hidden_states`` is
    deprecated in 5.24 and is to mean per-layer states from 5.30; the pooler output is a tensor or a
    list per image). The module, ``multi_modal_projector`` (its name is fixed by the checkpoint
    format), and `register_forward_hook` are stable.
    """
    captured: list[torch.Tensor] = []
    projector = model.model.multi_modal_projector
    handle = projector.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def _take_one(captured: list[torch.Tensor]) -> torch.Tensor:
    """The single projector output of the step just run (more or fewer would be a silent mix-up)."""
    if len(captured) != 1:
        raise RuntimeError(f"Expected one projector call per step, got {len(captured)}.")
    return captured.pop()


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
    with capture_projected_image_tokens(model) as captured:
        for _ in range(steps):
            idx = torch.tensor(next(batches))
            model.get_image_features(pixel_values=_hflip(pixels[idx], gen))  # tokens come from the hook
            loss = heads.loss(_take_one(captured), colors[idx], shapes[idx], VISION_COLOR_WEIGHT)
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
    with capture_projected_image_tokens(model) as captured:
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
            loss = out.loss + AUX_WEIGHT * align.loss(_take_one(captured), colors[idx], shapes[idx])
            _step(loss, opt, sched)
            bar.update()
            bar.set_postfix(stage="caption+match", loss=f"{loss.item():.3f}", refresh=False)


def _provenance(seed: int, schedule: Schedule, images: int) -> dict[str, Any]:
    """How a base was made, kept in its metrics file: enough to re-create it and to judge a re-run."""
    import transformers

    from .. import __version__

    arguments = f"seed={seed}" if schedule == Schedule() else f"seed={seed}, schedule={schedule}"
    return {
        "made_by": f"cmoe_adapters.easyvqa.pretrain.pretrain({arguments})",
        "seed": seed,
        "schedule": {**asdict(schedule), "images": images, "vision_batch_size": VISION_BATCH_SIZE},
        "versions": {
            "cmoe_adapters": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),  # float rounding of the steps can depend on it
    }


def pretrain(
    seed: int = 0, progress: bool = True, schedule: Schedule = Schedule()
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, dict[str, Any]]:
    """Build and pretrain the tiny LLaVA (no caching). Also returns its metrics: the held-out
    accuracies (``color``, ``shape``, ``matching``), wall-clock seconds (``vision_seconds``,
    ``mixed_seconds``, ``seconds``; ``cpu_seconds``) and how it was made (see `_provenance`)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model, processor = build_tiny_llava(seed)
    train_ids, held_out = _split_images(seed)
    train_ids, held_out = train_ids[: schedule.images], held_out[: schedule.held_out]
    rng = random.Random(f"pretrain/{seed}")
    gen = torch.Generator().manual_seed(seed)
    labels = _labels_of(train_ids)
    steps = schedule.vision_steps + schedule.mixed_steps

    model.train()
    with tqdm(total=steps, desc="pretraining tiny LLaVA", disable=not progress) as bar:
        pixels = _pixels(processor, train_ids)
        vision = (schedule.vision_steps, VISION_BATCH_SIZE)
        _train_vision(model, processor, pixels, labels, *vision, rng, gen, bar)
        vision_done = time.perf_counter()
        mixed = (schedule.mixed_steps, schedule.batch_size)
        _train_mixed(model, processor, train_ids, pixels, labels, *mixed, rng, bar)
    mixed_done = time.perf_counter()

    model.eval()
    metrics: dict[str, Any] = evaluate_base(model, processor, held_out, seed)
    metrics["held_out_images"] = len(held_out)
    metrics["vision_seconds"] = round(vision_done - start, 1)
    metrics["mixed_seconds"] = round(mixed_done - vision_done, 1)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    metrics["cpu_seconds"] = round(time.process_time() - cpu_start, 1)  # all threads; less load-dependent
    metrics.update(_provenance(seed, schedule, len(train_ids)))
    return model, processor, metrics


def save_base(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, metrics: dict[str, Any], path: Path
) -> None:
    """Save into a temporary directory beside `path`, then move it into place with one `os.replace`
    (if another process got there first, its copy is kept): readers never see half a base."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
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


def load_base(path: str | os.PathLike[str]) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A saved base and its processor, in eval mode; refuses weights that do not fit the model.

    `from_pretrained` only warns about missing or unexpected weights and initialises the missing
    ones at random, which here would be a base that silently knows nothing (e.g. a checkpoint
    layout an older transformers cannot read).
    """
    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    wrong = [f"{kind}: {', '.join(sorted(map(str, info[kind]))[:3])}" for kind in kinds if info.get(kind)]
    if wrong:
        details = "; ".join(wrong)
        raise ValueError(
            f"The base at {path} does not fit this transformers' LLaVA ({details}); pretrain one with "
            "this installation (cmoe demo --pretrain-base, with a fresh --cache-dir)."
        )
    return model.eval(), LlavaProcessor.from_pretrained(path)


def base_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A saved base's ``pretrain_metrics.json``: its held-out accuracies and how it was made."""
    return json.loads((Path(path) / METRICS_FILE).read_text())


def shipped_base() -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The base that ships with the package (``pretrain(seed=0)``, default schedule; see its
    ``pretrain_metrics.json``). Independent of any cache: it is read from the package itself."""
    if not (SHIPPED_BASE / METRICS_FILE).is_file():
        raise FileNotFoundError(
            f"This installation has no shipped base ({SHIPPED_BASE} is missing); pretrain one with "
            "`cmoe demo --pretrain-base`."
        )
    return load_base(SHIPPED_BASE)


def cached_base_path(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, schedule: Schedule = Schedule()
) -> Path:
    """Where `pretrained_base` keeps the base of `seed` (and a non-default `schedule`)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    tag = "" if schedule == Schedule() else f"-{schedule.name}"
    return root / f"{CACHE_NAME}{tag}-seed{seed}"


def pretrained_base(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    schedule: Schedule = Schedule(),
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The tiny LLaVA pretrained here and its processor, from `cached_base_path` (under `cache_dir`,
    default `default_cache_root()`); pretrained and cached there on a miss (~2.5 min on two idle
    cores). The held-out accuracies are printed (when `progress`) and kept, with how the base was
    made, in ``pretrain_metrics.json`` next to the weights. `shipped_base` needs no pretraining.
    """
    path = cached_base_path(cache_dir, seed, schedule)
    if (path / METRICS_FILE).is_file():
        return load_base(path)
    model, processor, metrics = pretrain(seed=seed, progress=progress, schedule=schedule)
    if progress:
        print(
            f"tiny LLaVA base pretrained in {metrics['seconds']:.0f} s; held-out accuracy: colour "
            f"{metrics['color']:.3f}, shape {metrics['shape']:.3f}, matching {metrics['matching']:.3f}"
        )
    save_base(model, processor, metrics, path)
    return model, processor


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmoe_adapters.easyvqa DIR [--seed 0] [--threads N]``: pretrain a base into DIR.

    How the shipped base is made (``DIR`` = ``cmoe_adapters/easyvqa/base``, the old one removed
    first), with the oldest supported transformers (5.0): later releases read its checkpoint layout,
    while 5.0 cannot read the vision tower of a checkpoint that 5.24 writes. The shipped one was made
    with ``--seed 0 --threads 1`` (one thread: a busy machine slows two down many times); made again
    that way with the versions its metrics file records, it came out the same, bit for bit.
    """
    parser = argparse.ArgumentParser(prog="python -m cmoe_adapters.easyvqa")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); rounding varies")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor, metrics = pretrain(seed=args.seed)
    save_base(model, processor, metrics, args.output_dir)
    print(json.dumps(metrics, indent=2))
    return 0
