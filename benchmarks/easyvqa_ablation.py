"""Ablation on the easy-vqa stream (4 tasks, tiny LLaVA, CPU), every run through ContinualMoETrainer.

Rows: one shared LoRA trained task after task (forgets), MoE-LoRA with one shared router and
shared experts (the CoIN MoELoRA baseline), the continual MoE (a router and new experts per task),
the llava_cmoe and cl_moe presets, and one LoRA per task with the true task id (the oracle). All
rows use the same pretrained base, data, steps and learning rate; tasks are *located* (not given)
when scored, except in the oracle row.

    python benchmarks/easyvqa_ablation.py [--steps 200] [--train 2000] [--test 500] [--only moe,lora]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model

from cmoe_adapters import ContinualMoEConfig, ContinualMoETrainer, ContinualTrainingArguments, Task
from cmoe_adapters._peft import adapter_parameters
from cmoe_adapters.architectures import default_target_modules
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.easyvqa import TASK_ORDER, load_task, shipped_base


def configs(targets: str) -> dict[str, object]:
    """The rows of the ablation: name -> peft config (rank 8 per token everywhere, same targets)."""
    return {
        "sequential LoRA": LoraConfig(r=8, lora_alpha=16, target_modules=targets),
        "MoE-LoRA, shared router": ContinualMoEConfig(
            r=4, lora_alpha=8, num_experts=4, top_k=2, experts_per_task=0, router_per_task=False,
            freeze_old_experts=False,
        ),
        "continual MoE (default)": ContinualMoEConfig(r=4, lora_alpha=8, num_experts=4, top_k=2),
        "continual MoE, routers over every expert": ContinualMoEConfig(
            r=4, lora_alpha=8, num_experts=4, top_k=2, router_max_experts=64
        ),
        "llava_cmoe preset": ContinualMoEConfig.llava_cmoe(r=4, lora_alpha=8),
        "cl_moe preset": ContinualMoEConfig.cl_moe(r=4, lora_alpha=8),
        "per-task LoRA, oracle task id": ContinualMoEConfig(
            r=8, lora_alpha=16, num_experts=1, top_k=None, experts_per_task=1
        ),
    }  # fmt: skip


def stream(train: int, test: int) -> list[Task]:
    return [
        Task(name, load_task(name, "train", train, seed=0), load_task(name, "test", test, seed=1))
        for name in TASK_ORDER
    ]


def run(name: str, config, base, processor, tasks, steps: int, output_dir: str):
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    args = ContinualTrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        eval_batch_size=250,
        eval_max_new_tokens=3,
        eval_oracle="oracle" in name,
        seed=0,
    )
    collator = VisionLanguageCollator(processor)
    trainer = ContinualMoETrainer(model=model, args=args, data_collator=collator, processing_class=processor)
    start = time.perf_counter()
    counts = []
    for task in tasks:  # one task at a time, to count what each task adds
        result = trainer.train_task(task)
        counts.append(parameter_counts(model))
    seconds = time.perf_counter() - start
    added = [counts[0]] + [
        (after[0] - before[0], after[1] - before[1]) for before, after in itertools.pairwise(counts)
    ]
    return result, seconds, added


def parameter_counts(model) -> tuple[int, int]:
    """(adapter weights, locator weights) of a peft model, trainable or frozen.

    The locator's VAE weights are buffers (fitted by the locator, not the optimizer).
    """
    adapter = sum(parameter.numel() for parameter in adapter_parameters(model))
    locator = sum(
        buffer.numel()
        for name, buffer in model.named_buffers()
        if "cmoe_locator" in name and name.endswith((".weight", ".bias"))
    )
    return adapter, locator


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--only", default=None, help="comma-separated substrings of row names")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, processor = shipped_base()
    tasks = stream(args.train, args.test)
    rows = configs(default_target_modules(base))  # the language model's linears, as the MoE rows
    if args.only:
        rows = {
            k: v for k, v in rows.items() if any(s.strip().lower() in k.lower() for s in args.only.split(","))
        }
    print(
        f"# easy-vqa, {len(tasks)} tasks, {args.steps} steps x 32 per task, {args.test} test questions each\n"
    )
    print(
        "| run | final average | BWT | locator accuracy | adapter params, task 1 | added per later task "
        "| locator params per task | train+eval s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    matrices = {}
    for name, config in rows.items():
        with tempfile.TemporaryDirectory() as output_dir:
            result, seconds, added = run(name, config, base, processor, tasks, args.steps, output_dir)
        matrix = result.oracle_accuracy_matrix if "oracle" in name else result.accuracy_matrix
        final = sum(matrix[-1]) / len(matrix[-1])
        bwt = sum(matrix[-1][j] - matrix[j][j] for j in range(len(matrix) - 1)) / (len(matrix) - 1)
        located = "-" if result.locator_accuracy is None else f"{100 * result.locator_accuracy:.1f}"
        later = [a for a, _ in added[1:]]
        per_later = sum(later) / max(len(later), 1)
        locator = sum(v for _, v in added) / len(added)
        cells = (
            f"{100 * final:.1f} | {100 * bwt:+.1f} | {located} | {added[0][0] / 1e3:.1f}k | "
            f"{per_later / 1e3:.1f}k | {locator / 1e3:.1f}k | {seconds:.0f}"
        )
        print(f"| {name} | {cells} |")
        matrices[name] = matrix
    for name, matrix in matrices.items():
        print(f"\n{name}: " + " / ".join(" ".join(f"{100 * v:.0f}" for v in row) for row in matrix))


if __name__ == "__main__":
    main()
