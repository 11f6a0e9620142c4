"""``cmoe train RUN.yaml --tiny``: a run file's whole path, offline, on a CPU, in seconds.

A recipe names a 7B model, eight GPUs and a benchmark's download; whether it is *valid* (every key,
path, metric, per-task setting and loader) and whether it *runs* (collator, probe phase, trainer,
locator, each task's scorer, results files) can still be checked anywhere: `--tiny` swaps the model
for a random one of the same architecture (`tiny_models`), caps each task's data at a few records,
trains a few steps per task and turns off what needs the real machine (DeepSpeed, bf16, TF32).
Everything else runs as written. Its scores mean nothing; that it finishes, with every task scored
by its benchmark's metric, is the check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

# training fields --tiny replaces (None removes one): a few CPU steps, nothing a GPU or a cluster needs
TINY_TRAINING: dict[str, Any] = {
    "max_steps": 4,  # the locator needs 4 features or more: 3 fixture records, 2 per batch
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "eval_batch_size": 4,
    "deepspeed": None,
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "dataloader_num_workers": 0,
    "save_strategy": "no",
    "push_to_hub": False,
    "report_to": "none",
    "logging_steps": 1,
}
TINY_RECORDS = 4  # per task and split
TINY_MAX_NEW_TOKENS = 8  # answers of a random model mean nothing; every scorer still parses them
TINY_MAX_LENGTH = 512  # the stand-ins' positions
# a task's own settings that --tiny leaves to TINY_TRAINING
_PER_TASK_REPLACED = (
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)


def tiny_output_dir(output_dir: str) -> str:
    """Where a --tiny run writes when no --output-dir is given: beside the real run's, never in it."""
    return output_dir.rstrip("/\\") + "-tiny"


def _short_answers(training: dict[str, Any]) -> dict[str, Any]:
    """`training` with its answer length, if it sets one, capped at `TINY_MAX_NEW_TOKENS`."""
    if "eval_max_new_tokens" in training:
        training["eval_max_new_tokens"] = min(int(training["eval_max_new_tokens"]), TINY_MAX_NEW_TOKENS)
    return training


def tiny_task_training(training: Mapping[str, Any]) -> dict[str, Any]:
    """A task's own settings under --tiny: its learning rate etc. kept, its length and batch not."""
    return _short_answers({key: value for key, value in training.items() if key not in _PER_TASK_REPLACED})


def _runnable_metric(spec: Any, warnings: list[str]) -> str:
    """The task's metric, or its pure-Python stand-in where this machine lacks what it needs."""
    from .scorers import get_scorer

    scorer = get_scorer(spec.metric)
    if scorer.missing() is None or scorer.stand_in is None:
        return spec.metric
    warnings.append(f"--tiny: {spec.name} is scored by {scorer.stand_in!r} here, not {spec.metric!r}")
    return scorer.stand_in


def tiny_config(config: Any) -> Any:
    """The validated run (`RunConfig`) with --tiny's per-task settings, metrics and sequence length."""
    config.tasks = [
        dataclasses.replace(
            spec,
            training=tiny_task_training(spec.training),
            metric=_runnable_metric(spec, config.warnings),
        )
        for spec in config.tasks
    ]
    config.max_length = min(config.max_length or TINY_MAX_LENGTH, TINY_MAX_LENGTH)
    config.dtype = "float32"
    _short_answers(config.training)
    return config


def tiny_data(data: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each task's first `TINY_RECORDS` records of each split (the CLI's ``_task_data`` layout)."""
    capped = {}
    for name, entry in data.items():
        capped[name] = {
            key: value[:TINY_RECORDS] if key in ("train", "eval") and value is not None else value
            for key, value in entry.items()
        }
    return capped


def record_texts(record: Mapping[str, Any]) -> Iterable[str]:
    """The text of a record in any of the loaders' layouts (conversation turns, question, answers)."""
    for turn in record.get("conversations") or ():
        if isinstance(turn, Mapping) and isinstance(turn.get("value"), str):
            yield turn["value"]
    for key in ("question", "answer"):
        if isinstance(record.get(key), str):
            yield record[key]


def tiny_base(model_class: str, data: Mapping[str, Mapping[str, Any]], seed: int = 0) -> tuple[Any, Any]:
    """The tiny stand-in of `model_class`, its tokenizer trained on every text of the run's data."""
    from .tiny_models import build_tiny_model

    corpus = [
        text
        for entry in data.values()
        for split in ("train", "eval")
        for record in entry.get(split) or ()
        for text in record_texts(record)
    ]
    return build_tiny_model(model_class, corpus, seed)
