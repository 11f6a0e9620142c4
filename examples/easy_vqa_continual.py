"""Continual VQA on easy-vqa with a tiny LLaVA on CPU: `cmoe demo`'s continual run as plain library code.

Copy this file to start your own stream: swap the base model, the processor and the task data,
keep the rest. Four tasks are learnt one after another (shape, colour, yes/no about shape, yes/no
about colour); after each, every task seen so far is evaluated with its task *located* from the
question and image alone. The run writes one adapter per task to ``<output-dir>/<task>`` and
``results.json`` / ``results.md`` / ``results.png``.

    pip install "cmoe-adapters[demo]"
    python examples/easy_vqa_continual.py --output-dir easy-vqa-run
    python examples/easy_vqa_continual.py --tiny    # a few steps on an untrained base (smoke test)
"""

from __future__ import annotations

import argparse

from peft import PeftModel, get_peft_model

from cmoe_adapters import ContinualMoEConfig, ContinualMoETrainer, ContinualTrainingArguments, Task
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.easyvqa import TASK_ORDER, build_tiny_llava, load_task, shipped_base


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="easy-vqa-run")
    parser.add_argument("--steps", type=int, default=200, help="training steps per task")
    parser.add_argument("--tiny", action="store_true", help="untrained base, 2 tasks, 3 steps: a smoke test")
    args = parser.parse_args()

    # 1. A base model and its processor. Here: the demo's tiny LLaVA, pretrained once and cached.
    base, processor = build_tiny_llava(seed=0) if args.tiny else shipped_base()
    steps, task_names, n_train, n_test = args.steps, TASK_ORDER, 2000, 300
    if args.tiny:
        steps, task_names, n_train, n_test = 3, TASK_ORDER[:2], 64, 16

    # 2. The tasks: records {"image", "question", "answer"} (or LLaVA conversations, see data.py).
    tasks = [
        Task(name, load_task(name, "train", n_train, seed=0), load_task(name, "test", n_test, seed=1))
        for name in task_names
    ]

    # 3. The adapter: 4 LoRA experts of rank 4 per layer, top-2 routing, a router per task.
    model = get_peft_model(base, ContinualMoEConfig(r=4, lora_alpha=8, num_experts=4, top_k=2))

    # 4. The trainer: a transformers.Trainer that walks the stream task by task.
    training_args = ContinualTrainingArguments(
        output_dir=args.output_dir,
        max_steps=steps,  # per task
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        eval_batch_size=250,
        eval_max_new_tokens=3,
        eval_oracle=True,  # also score with the true task, to show the locator's gap (none, here)
    )
    trainer = ContinualMoETrainer(
        model=model,
        args=training_args,
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
    )
    result = trainer.train_tasks(tasks)
    print(result.markdown())

    # 5. Any task's state comes back with peft; the task is located per sample when not given.
    last = task_names[-1]
    fresh_base = build_tiny_llava(seed=0)[0] if args.tiny else shipped_base()[0]
    reloaded = PeftModel.from_pretrained(fresh_base, f"{args.output_dir}/{last}")
    batch = VisionLanguageCollator(processor).generation_inputs(tasks[0].eval_dataset[:4])
    print("located tasks:", reloaded.locate_tasks(**batch))


if __name__ == "__main__":
    main()
