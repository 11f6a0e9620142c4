"""The task locator on real data: the four easy-vqa tasks, identified from their test questions."""

from __future__ import annotations

from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.easyvqa import TASK_ORDER, build_tiny_llava, load_task


def batches(collator, records, size=100):
    for start in range(0, len(records), size):
        yield collator(records[start : start + size])


def test_four_easy_vqa_tasks_are_located_from_their_test_questions():
    base, processor = build_tiny_llava(seed=0)
    collator = VisionLanguageCollator(processor)
    config = ContinualMoEConfig(r=4, num_experts=2, top_k=1, locator_steps=400)
    model = get_peft_model(base.eval(), config)
    for task in TASK_ORDER:
        model.add_task(task)
        model.collect_locator_features(
            batches(collator, load_task(task, "train", 200, seed=0)), progress=False
        )
        model.fit_locator(task)

    correct, total = 0, 0
    for task in TASK_ORDER:
        records = load_task(task, "test", 150, seed=1)
        located = model.locate_tasks(**collator.generation_inputs(records))
        correct += located.count(task)
        total += len(records)
    assert correct / total >= 0.98, f"locator accuracy {correct / total:.3f}"
