"""What every real-model example shares: the command line, the method preset, the training
arguments, the run and the report.

Kept in one place so that the examples differ only where the models and data sets differ, and so
that `--tiny` changes sizes, never the code path.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from cmoe_adapters import (
    ContinualMoEConfig,
    ContinualMoETrainer,
    ContinualResult,
    ContinualTrainingArguments,
    Task,
)
from cmoe_adapters._compat import checkpointing_argument  # the argument's name moved within transformers 5.x
from cmoe_adapters.config import PRESETS
from cmoe_adapters.data import VisionLanguageCollator

# transformers warns about its own deprecated alias whenever peft asks; nothing to act on here
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# Sizes of a `--tiny` run: six optimizer steps per task on 12 records and a small locator, so
# that a whole stream takes seconds on one CPU core while every phase (probe, train, locate,
# evaluate, save) runs. --tiny overrides the corresponding command-line options.
TINY_SETTINGS: dict[str, Any] = {
    "max_steps": 6,
    "batch_size": 4,
    "eval_batch_size": 8,
    "learning_rate": 2e-2,
    "logging_steps": 1,
    "dataloader_workers": 0,
    "eval_max_new_tokens": 4,
}
TINY_METHOD: dict[str, Any] = {"r": 4, "lora_alpha": 8, "num_experts": 2, "top_k": 1, "locator_steps": 50}


def add_common_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    """The options every example takes (model, method, training, Hub, `--tiny`)."""
    model = parser.add_argument_group("model and method")
    model.add_argument("--model", default=default_model, help="Hub id or local path of the base model.")
    model.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="default: ContinualMoEConfig() (a router per task, frozen old experts, a task locator); "
        "llava_cmoe: + probe-guided expert expansion; cl_moe: dual router + momentum merge.",
    )
    model.add_argument("--lora-r", type=int, help="Rank of each expert (default: the preset's).")
    model.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator (default: the preset's).")
    model.add_argument("--num-experts", type=int, help="Experts of the first task (default: the preset's).")
    model.add_argument(
        "--top-k", type=int, help="Experts per token; 0 routes densely (default: the preset's)."
    )

    train = parser.add_argument_group("training (every option applies to each task)")
    train.add_argument("--output-dir", required=True, help="Per-task adapters, results.json and checkpoints.")
    train.add_argument("--epochs", type=float, default=1.0, help="Epochs per task.")
    train.add_argument("--max-steps", type=int, default=-1, help="Steps per task (overrides --epochs).")
    train.add_argument("--learning-rate", type=float, default=2e-4, help="Peak learning rate of each task.")
    train.add_argument("--batch-size", type=int, default=8, help="Training batch size per device.")
    train.add_argument("--eval-batch-size", type=int, default=16, help="Generation batch size of evaluation.")
    train.add_argument("--gradient-accumulation", type=int, default=1, help="Gradient accumulation steps.")
    train.add_argument("--warmup", type=float, default=0.03, help="Warm-up: a ratio in [0, 1) or steps.")
    train.add_argument("--max-length", type=int, help="Truncate sequences to this many tokens.")
    train.add_argument(
        "--max-train-samples", type=int, help="Use at most this many training records per task."
    )
    train.add_argument("--max-eval-samples", type=int, help="Evaluate on at most this many records per task.")
    train.add_argument("--eval-max-new-tokens", type=int, default=16, help="Tokens generated per answer.")
    train.add_argument(
        "--eval-oracle", action="store_true", help="Also evaluate with the true task (the locator's cost)."
    )
    train.add_argument("--deepspeed", help="DeepSpeed config, e.g. examples/deepspeed/zero2.json.")
    train.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="Keep activations instead of recomputing them (faster, much more memory).",
    )
    train.add_argument("--logging-steps", type=int, default=10, help="Log every this many steps.")
    train.add_argument("--save-steps", type=int, default=500, help="Checkpoint every this many steps.")
    train.add_argument("--dataloader-workers", type=int, default=4, help="Data loading processes per device.")
    train.add_argument("--report-to", default="none", help="'none', 'tensorboard', 'wandb', ...")
    train.add_argument("--seed", type=int, default=42, help="Random seed.")
    train.add_argument(
        "--resume", action="store_true", help="Restore finished tasks from --output-dir, continue the rest."
    )

    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push-to-hub", action="store_true", help="Push every finished task as one revision.")
    hub.add_argument("--hub-model-id", help="Repository to push to (default: the output dir's name).")
    hub.add_argument("--hub-private", action="store_true", help="Create the repository private.")

    # the `deepspeed` launcher passes --local_rank to the script (TrainingArguments reads LOCAL_RANK)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="Run the same code on a tiny random model of the same architecture and a synthetic data "
        "set written to a temporary directory: CPU, fp32, seconds, nothing downloaded.",
    )


def apply_tiny_settings(args: argparse.Namespace) -> None:
    """Shrink the run for `--tiny` (only sizes and devices; the code path stays the same)."""
    for name, value in TINY_SETTINGS.items():
        setattr(args, name, value)  # --deepspeed is kept: DeepSpeed also runs on CPU (gloo)
    if args.push_to_hub:
        raise SystemExit("--tiny runs offline: leave out --push-to-hub.")


def method_config(args: argparse.Namespace) -> ContinualMoEConfig:
    """The preset, with the options given on the command line (and `--tiny`'s sizes) on top."""
    overrides: dict[str, Any] = dict(TINY_METHOD) if args.tiny else {}
    given = {
        "r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "num_experts": args.num_experts,
        "top_k": args.top_k,
    }
    overrides.update({key: value for key, value in given.items() if value is not None})
    if overrides.get("top_k") == 0:
        overrides["top_k"] = None
    return ContinualMoEConfig.from_preset(args.preset, **overrides)


def training_arguments(args: argparse.Namespace) -> ContinualTrainingArguments:
    """bf16 and gradient checkpointing on GPUs; fp32 on the CPU for `--tiny`.

    Build these *before* loading the model: with a ZeRO-3 config, transformers then loads the
    weights already partitioned over the GPUs.
    """
    return ContinualTrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation,
        warmup_steps=args.warmup,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        bf16=not args.tiny,
        use_cpu=args.tiny,
        **checkpointing_argument(args.gradient_checkpointing),
        deepspeed=args.deepspeed,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        dataloader_num_workers=args.dataloader_workers,
        report_to=args.report_to,
        seed=args.seed,
        eval_max_new_tokens=args.eval_max_new_tokens,
        eval_oracle=args.eval_oracle,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        hub_private_repo=args.hub_private or None,
        disable_tqdm=args.tiny,
    )


def limit(records: Sequence[Any], count: int | None) -> Sequence[Any]:
    """The first `count` records (all with None)."""
    return records if count is None else records[:count]


def run_stream(
    model: Any,
    processor: Any,
    collator: VisionLanguageCollator,
    tasks: Sequence[Task],
    args: argparse.Namespace,
    training_args: ContinualTrainingArguments,
) -> ContinualResult:
    """Wrap the model with the method, train the stream task by task, print and return the result."""
    from peft import get_peft_model

    config = method_config(args)
    peft_model = get_peft_model(model, config)
    trainer = ContinualMoETrainer(
        model=peft_model,
        args=training_args,
        data_collator=collator,
        processing_class=processor,
    )
    result = trainer.train_tasks(tasks, resume_from_checkpoint=args.resume)
    if trainer.is_world_process_zero():
        print_result(result, args.output_dir)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # exit together, with no communication thread left running
        torch.distributed.destroy_process_group()
    return result


def print_result(result: ContinualResult, output_dir: str) -> None:
    """The accuracy matrix (rows: after training task i) and the continual metrics."""
    width = max(len(name) for name in result.tasks) + 2
    print("\naccuracy (%) after training the row's task, on the column's task (task located, not given)")
    print(" " * width + "".join(f"{name:>{width}}" for name in result.tasks))
    for name, row in zip(result.tasks, result.accuracy_matrix, strict=True):
        cells = "".join(f"{'-' if v is None else f'{100 * v:.1f}':>{width}}" for v in row)
        print(f"{name:<{width}}{cells}")
    summary = {key: value for key, value in result.summary().items() if value is not None}
    print(json.dumps({key: round(100 * value, 2) for key, value in summary.items()}, indent=1))
    print(
        f"adapters after each task: {os.path.join(output_dir, '<task>')}; matrix: results.json / results.md"
    )
