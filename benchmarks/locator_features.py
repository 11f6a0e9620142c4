"""Locator accuracy per feature choice on the easy-vqa stream (4 tasks), held-out test questions.

Compares the default feature (the first adapted layer's input, pooled over the prompt, taken in
the forward pass the model does anyway) with LLaVA-CMoE's (the frozen base model's last hidden
state, one extra forward pass), each pooled by mean or last prompt token, on the pretrained tiny
LLaVA of the demo (built and cached on first use) or, with --random-base, an untrained one.

    python benchmarks/locator_features.py [--train 400] [--test 250]
"""

from __future__ import annotations

import argparse
import time

from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.easyvqa import TASK_ORDER, build_tiny_llava, load_task, shipped_base

CHOICES = [
    ("first_layer_input", "text_image_moments"),
    ("first_layer_input", "text_image_mean"),
    ("first_layer_input", "mean"),
    ("first_layer_input", "last"),
    ("base_last_hidden", "last"),
    ("base_last_hidden", "mean"),
    ("base_last_hidden", "text_image_mean"),
]


def accuracy(
    base, processor, source: str, pooling: str, train: int, test: int
) -> tuple[dict[str, float], float]:
    collator = VisionLanguageCollator(processor)
    config = ContinualMoEConfig(
        r=4,
        num_experts=2,
        top_k=1,
        locator_feature_source=source,
        locator_pooling=pooling,
        locator_open_set="nearest",  # closed-set accuracy: the open set is measured in locator_open_set.py
    )
    model = get_peft_model(base, config)
    for task in TASK_ORDER:
        model.add_task(task)
        records = load_task(task, "train", train, seed=0)
        model.collect_locator_features(
            (collator(records[i : i + 100]) for i in range(0, len(records), 100)), progress=False
        )
        model.fit_locator(task)
    per_task = {}
    for task in TASK_ORDER:
        records = load_task(task, "test", test, seed=1)
        located = []
        for i in range(0, len(records), 125):
            located += model.locate_tasks(**collator.generation_inputs(records[i : i + 125]))
        per_task[task] = located.count(task) / len(located)
    model.unload()
    return per_task, sum(per_task.values()) / len(per_task)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=250)
    parser.add_argument("--random-base", action="store_true")
    args = parser.parse_args()
    base, processor = build_tiny_llava(seed=0) if args.random_base else shipped_base()
    base.eval()
    kind = "untrained" if args.random_base else "pretrained"
    print(
        f"# locator accuracy, {kind} tiny LLaVA, {args.train} train / {args.test} test questions per task\n"
    )
    print("| feature source | pooling | extra pass | " + " | ".join(TASK_ORDER) + " | mean | seconds |")
    print("|---|---|---|" + "---:|" * (len(TASK_ORDER) + 2))
    for source, pooling in CHOICES:
        start = time.perf_counter()
        per_task, mean = accuracy(base, processor, source, pooling, args.train, args.test)
        cells = " | ".join(f"{100 * per_task[t]:.1f}" for t in TASK_ORDER)
        extra = "yes" if source == "base_last_hidden" else "no"
        seconds = time.perf_counter() - start
        print(f"| {source} | {pooling} | {extra} | {cells} | {100 * mean:.1f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
