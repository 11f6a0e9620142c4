"""Locate tasks that differ only in their images, and send inputs of no learnt task to the base model.

Three tasks ask the same question, "what is in the image?", about drawn digits, flat colour
patches and black-and-white stripes (`cmoe_adapters.easyvqa.streams`). The locator is fitted on
each task's prompts; no expert needs training for that, because the feature is taken before any
adapter acts. Then it locates held-out inputs of each task, and inputs of tasks it never learnt
(checkerboards; another question), which the base model answers with its adapters off.

    python examples/locate_open_set.py [--train 500] [--test 100]
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.easyvqa import build_tiny_llava
from cmoe_adapters.easyvqa.streams import (
    SAME_QUESTION_TASKS,
    STREAM_WORDS,
    image_kind_records,
    unknown_inputs,
)
from cmoe_adapters.metrics import auroc


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=500, help="training prompts per task (locator features)")
    parser.add_argument(
        "--test", type=int, default=100, help="held-out prompts per task and per unknown kind"
    )
    args = parser.parse_args()

    base, processor = build_tiny_llava(seed=0, extra_words=STREAM_WORDS)
    collator = VisionLanguageCollator(processor)
    model = get_peft_model(base.eval(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    for task in SAME_QUESTION_TASKS:
        model.add_task(task)
        records = image_kind_records(task, "train", args.train)
        model.collect_locator_features(
            (collator(records[i : i + 100]) for i in range(0, len(records), 100)), progress=False
        )
        model.fit_locator(task)

    print("| inputs | " + " | ".join(SAME_QUESTION_TASKS) + " | none (base model) |")
    print("|---|" + "---:|" * (len(SAME_QUESTION_TASKS) + 1))
    known_novelty: list[float] = []

    def report(name: str, records: list[dict]) -> list[float]:
        location = model.locate_tasks(**collator.generation_inputs(records), return_scores=True)
        shares = [location.tasks.count(task) / len(records) for task in (*SAME_QUESTION_TASKS, None)]
        print(f"| {name} | " + " | ".join(f"{100 * share:.0f}%" for share in shares) + " |")
        return location.novelty.tolist()

    for task in SAME_QUESTION_TASKS:
        known_novelty += report(task, image_kind_records(task, "test", args.test, seed=1))
    unknown = unknown_inputs("same_question", "test", args.test, seed=1)
    novelty = {kind: report(f"unknown: {kind}", records) for kind, records in unknown.items()}
    print()
    for kind, scores in novelty.items():
        print(f"open-set AUROC, {kind}: {auroc(known_novelty, scores):.3f}")

    # an unknown input gets exactly the base model's answer, even next to a learnt task's input
    batch = collator.generation_inputs(
        [unknown["patches_other_question"][0], image_kind_records("stripes", "test", 1)[0]]
    )
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
        with model.disable_adapter():
            alone = model.generate(**batch, max_new_tokens=2, do_sample=False)
    print(
        f"\nlocated: {model.locate_tasks(**batch)}; the unknown input's tokens equal the base model's: "
        f"{torch.equal(generated[0], alone[0])}"
    )


if __name__ == "__main__":
    main()
