"""Task location on two hard streams, and the open-set decision, per feature and density choice.

Two streams (`cmoe_adapters.easyvqa.streams`): **same question** (digits, colour patches,
stripes, all asked "what is in the image?": only the image tells the tasks apart) and **near-
duplicate wording** (11 yes/no tasks "is there a red shape?", ..., "is there a circle?" on the
same easy-vqa images: one word tells them apart). Each has inputs of tasks it never learns
(`unknown_inputs`). For every stream x base (a random tiny LLaVA, the demo's pretrained one) x
feature (the first adapted layer's input pooled as text mean + image mean + image spread, the
default, or without the spread; LLaVA-CMoE's frozen base last hidden state, last prompt token) x
density (Gaussian, the default; LLaVA-CMoE's VAE), one locator is fitted per task -- no expert is
trained: the feature is taken before any adapter acts -- and measured on held-out test inputs:

* closed-set accuracy: the nearest task (``locator_open_set="nearest"``), mean over tasks and the
  worst task;
* false rejections: the share of the learnt tasks' test inputs outside every fence (default 10);
* per unknown kind: AUROC of the novelty score against the learnt tasks' test inputs, and the
  share detected at the default fence;
* seconds to collect the features (forward passes) and to fit the densities.

Then, for the default choice only, a fence sweep computed from the novelty scores of the
default-fitted models (``unknown = novelty > fence``, exactly what a model fitted with that fence
decides: the fence does not enter the fit).

    python benchmarks/locator_open_set.py [--train 1000] [--test 200] [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.easyvqa import build_tiny_llava, shipped_base
from cmoe_adapters.easyvqa.streams import (
    NEAR_DUPLICATE_TASKS,
    SAME_QUESTION_TASKS,
    STREAM_WORDS,
    image_kind_records,
    near_duplicate_records,
    unknown_inputs,
)
from cmoe_adapters.metrics import auroc

STREAMS: dict[str, tuple[tuple[str, ...], Callable[..., list[dict]]]] = {
    "same_question": (SAME_QUESTION_TASKS, image_kind_records),
    "near_duplicate": (NEAR_DUPLICATE_TASKS, near_duplicate_records),
}
BASES = ("random", "shipped")
FEATURES = (  # (label, locator_feature_source, locator_pooling)
    ("first layer, text+image moments", "first_layer_input", "text_image_moments"),
    ("first layer, text+image mean", "first_layer_input", "text_image_mean"),
    ("base last hidden, last token", "base_last_hidden", "last"),
)
DENSITIES = ("gaussian", "vae")
DEFAULT = (FEATURES[0][0], "gaussian")
FENCE = ContinualMoEConfig().locator_open_set_fence
SWEEP = (3.0, 5.0, 10.0, 20.0)
BATCH = 100


@dataclass
class Data:
    """One stream's collated inputs for one base: training batches, test and unknown prompts."""

    tasks: tuple[str, ...]
    train: dict[str, list[dict]]  # task -> batches with labels
    test: dict[str, list[dict]]  # task -> prompt batches
    unknown: dict[str, list[dict]]  # unknown kind -> prompt batches
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (train, test)


@dataclass
class Result:
    accuracy: dict[str, float]  # task -> closed-set accuracy
    known_novelty: list[float]
    known_unknown: list[bool]
    unknown_novelty: dict[str, list[float]]
    unknown_unknown: dict[str, list[bool]]
    collect_s: float
    fit_s: float


def batches(records: list[dict], make: Callable[[list[dict]], dict]) -> list[dict]:
    return [make(records[i : i + BATCH]) for i in range(0, len(records), BATCH)]


def stream_records(stream: str, train: int, test: int) -> tuple[dict, dict, dict]:
    tasks, make = STREAMS[stream]
    train_records = {t: make(t, "train", train, seed=0) for t in tasks}
    test_records = {t: make(t, "test", test, seed=0) for t in tasks}
    return train_records, test_records, unknown_inputs(stream, "test", test, seed=0)


def collate(stream: str, records: tuple[dict, dict, dict], processor) -> Data:
    collator = VisionLanguageCollator(processor)
    train, test, unknown = records
    return Data(
        tasks=STREAMS[stream][0],
        train={t: batches(r, collator) for t, r in train.items()},
        test={t: batches(r, collator.generation_inputs) for t, r in test.items()},
        unknown={k: batches(r, collator.generation_inputs) for k, r in unknown.items()},
        counts={t: (len(train[t]), len(test[t])) for t in train},
    )


def locate(model, prompt_batches: list[dict]) -> tuple[list[str], list[float], list[bool]]:
    tasks, novelty, unknown = [], [], []
    for inputs in prompt_batches:
        location = model.locate_tasks(**inputs, return_scores=True)
        tasks += location.tasks
        novelty += location.novelty.tolist()
        unknown += location.unknown.tolist()
    return tasks, novelty, unknown


def evaluate(base, data: Data, source: str, pooling: str, density: str, vae_steps: int) -> Result:
    config = ContinualMoEConfig(
        r=4,
        num_experts=2,
        top_k=1,
        locator_feature_source=source,
        locator_pooling=pooling,
        locator_density=density,
        locator_steps=vae_steps,
        locator_open_set="nearest",  # .tasks = the nearest task; .unknown = the fence's decision
    )
    model = get_peft_model(base, config)
    collect_s = fit_s = 0.0
    for task in data.tasks:
        model.add_task(task)
        start = time.perf_counter()
        model.collect_locator_features(data.train[task], progress=False)
        middle = time.perf_counter()
        model.fit_locator(task)
        collect_s, fit_s = collect_s + middle - start, fit_s + time.perf_counter() - middle
    accuracy, known_novelty, known_unknown = {}, [], []
    for task in data.tasks:
        located, novelty, unknown = locate(model, data.test[task])
        accuracy[task] = located.count(task) / len(located)
        known_novelty += novelty
        known_unknown += unknown
    unknown_novelty, unknown_unknown = {}, {}
    for kind, prompt_batches in data.unknown.items():
        _, unknown_novelty[kind], unknown_unknown[kind] = locate(model, prompt_batches)
    model.unload()
    return Result(accuracy, known_novelty, known_unknown, unknown_novelty, unknown_unknown, collect_s, fit_s)


def pct(flags: list[bool]) -> float:
    return 100 * sum(flags) / len(flags)


def print_stream(stream: str, data: Data, results: dict[tuple[str, str, str], Result]) -> None:
    kinds = list(data.unknown)
    tasks = data.tasks
    train = [data.counts[t][0] for t in tasks]
    test = [data.counts[t][1] for t in tasks]
    print(
        f"\n### {stream} ({len(tasks)} tasks: {', '.join(tasks)}; {min(train)}-{max(train)} train, "
        f"{min(test)}-{max(test)} test inputs per task; unknown kinds: {', '.join(kinds)})\n"
    )
    print(
        "| base | feature | density | closed-set % (mean) | worst task % | false rejections % "
        f"(fence {FENCE:g}) | "
        + " | ".join(f"{k}: AUROC / detected %" for k in kinds)
        + " | collect s | fit s |"
    )
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(kinds) + "---:|---:|")
    for (base, feature, density), r in results.items():
        mean = 100 * sum(r.accuracy.values()) / len(r.accuracy)
        worst = min(r.accuracy, key=r.accuracy.get)
        worst_cell = f"{100 * r.accuracy[worst]:.1f}" + (f" ({worst})" if r.accuracy[worst] < 1 else "")
        cells = " | ".join(
            f"{auroc(r.known_novelty, r.unknown_novelty[k]):.3f} / {pct(r.unknown_unknown[k]):.1f}"
            for k in kinds
        )
        print(
            f"| {base} | {feature} | {density} | {mean:.1f} | {worst_cell} | "
            f"{pct(r.known_unknown):.1f} | {cells} | {r.collect_s:.1f} | {r.fit_s:.1f} |"
        )


def print_sweep(stream: str, kinds: list[str], results: dict[str, Result]) -> None:
    print(f"\n### fence sweep, {stream}, default choice ({DEFAULT[0]}, {DEFAULT[1]})\n")
    print("| base | fence | false rejections % | " + " | ".join(f"{k} detected %" for k in kinds) + " |")
    print("|---|---:|---:|" + "---:|" * len(kinds))
    for base, r in results.items():
        for fence in SWEEP:
            rejected = [v > fence for v in r.known_novelty]
            detected = " | ".join(f"{pct([v > fence for v in r.unknown_novelty[k]]):.1f}" for k in kinds)
            print(f"| {base} | {fence:g} | {pct(rejected):.1f} | {detected} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1000, help="train inputs per task (at most)")
    parser.add_argument("--test", type=int, default=200, help="test inputs per task and per unknown kind")
    parser.add_argument("--vae-steps", type=int, default=ContinualMoEConfig().locator_steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="100 train / 40 test, 100 VAE steps")
    args = parser.parse_args()
    if args.quick:
        args.train, args.test, args.vae_steps = 100, 40, 100
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(
        f"# task location and the open set: {args.train} train / {args.test} test inputs per task "
        f"(at most: the near-duplicate colour tasks have fewer), VAE {args.vae_steps} steps, "
        f"{args.threads} thread(s)"
    )
    models = {
        "random": lambda: build_tiny_llava(seed=0, extra_words=STREAM_WORDS),
        "shipped": shipped_base,
    }
    sweeps: dict[str, tuple[list[str], dict[str, Result]]] = {}
    for stream in STREAMS:
        records = stream_records(stream, args.train, args.test)
        results: dict[tuple[str, str, str], Result] = {}
        data = None
        for base_name in BASES:
            base, processor = models[base_name]()
            base.eval()
            data = collate(stream, records, processor)
            for label, source, pooling in FEATURES:
                for density in DENSITIES:
                    results[(base_name, label, density)] = evaluate(
                        base, data, source, pooling, density, args.vae_steps
                    )
        print_stream(stream, data, results)
        defaults = {b: results[(b, *DEFAULT)] for b in BASES}
        sweeps[stream] = (list(data.unknown), defaults)
    for stream, (kinds, defaults) in sweeps.items():
        print_sweep(stream, kinds, defaults)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
