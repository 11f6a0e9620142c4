"""`ContinualMoETrainer`: transformers' Trainer, one task after another.

For every task: add it to the model (its router and experts; everything older is frozen), train
only its parameters with a fresh optimizer and scheduler (the Trainer's own loop: mixed precision,
gradient accumulation, checkpointing, logging and accelerate all work as usual), fit its task
locator on features collected during that same training, evaluate every task seen so far with
the task *located* (and optionally with the true task), and save the state atomically to
``output_dir/<task>``. A crashed stream resumes: finished tasks are restored from their saves,
the interrupted task from its last Trainer checkpoint.

The same trainer also runs a plain peft model (e.g. one shared LoRA trained sequentially), which
is the forgetting baseline to compare against.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    SaveStrategy,
    enable_full_determinism,
    get_last_checkpoint,
    set_seed,
)

from . import hub, shards, zero3
from ._compat import activation_checkpointing, set_train_batch_size, with_checkpointing_kwargs
from .aux_loss import RouterAuxLossMixin
from .config import validate_task_name
from .evaluation import SeenTasksEvaluation, evaluate_seen_tasks, generated_score
from .integrity import AdapterFileError
from .lifecycle import gather_objects
from .locator import FeatureBuffer
from .results import ContinualResult, write_atomically
from .scorers import get_scorer

CHECKPOINTS_DIR = "checkpoints"
LOCATOR_FEATURES = "locator_features"
USAGE_COUNTS = "expert_usage_counts"
PROGRESS_DIGESTS = "digests"  # in the locator-features json: the two progress files' tensor digests
# TrainingArguments fields a task may set for itself (`Task.training_args`): what published setups
# vary from task to task (CoIN's batch sizes, MLLM-CL's epochs and answer lengths). Everything else
# (precision, DeepSpeed, saving, logging) is one setting of the whole stream.
PER_TASK_ARGUMENTS = (
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "eval_max_new_tokens",
)
# DeepSpeed writes these into its config once, when the arguments are built
BATCH_ARGUMENTS = ("per_device_train_batch_size", "gradient_accumulation_steps")


@dataclass
class ContinualTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the continual settings. Every Trainer argument applies per task.

    Args:
        eval_oracle: also evaluate every seen task with its true task id, which shows how much
            accuracy the task locator costs (the "locator gap").
        eval_max_new_tokens: tokens generated per answer by the default evaluator.
        eval_batch_size: batch size of the default evaluator and of locating eval sets
            (default: ``per_device_eval_batch_size``).
        remove_unused_columns: False by default, because records carry images and raw text that
            the data collator (not the model's forward) consumes.
    """

    eval_oracle: bool = field(default=False, metadata={"help": "Also evaluate with the true task ids."})
    eval_max_new_tokens: int = field(
        default=16, metadata={"help": "Max new tokens of the default evaluator."}
    )
    eval_batch_size: int | None = field(default=None, metadata={"help": "Batch size of evaluation."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep raw columns (images, text) for the data collator."}
    )


@dataclass
class Task:
    """One task of the stream.

    ``evaluate(model, eval_dataset) -> float in [0, 1]`` scores the model, which is in eval mode
    with *no task given* (it must locate). Without it, the default evaluator generates greedily
    on records ``{"image", "question", "answer"}`` and scores the answers by ``metric``: a
    benchmark's own rule (`scorers.SCORERS`, e.g. ``"vqa"`` for TextVQA; see
    `scorers.benchmark_metric`), normalised exact match by default.

    ``training_args`` sets `PER_TASK_ARGUMENTS` fields of the trainer's arguments for this task
    only (its probe phase and training; ``eval_max_new_tokens`` wherever the task is evaluated),
    e.g. ``{"num_train_epochs": 3}`` for a task a published setup trains longer.
    """

    name: str
    train_dataset: Any
    eval_dataset: Any = None
    evaluate: Callable[[Any, Any], float] | None = None
    metric: str = "exact_match"
    training_args: Mapping[str, Any] = field(default_factory=dict)


class _Subset:
    """`size` records spread evenly over a data set (a probe phase needs a little of everything)."""

    def __init__(self, dataset: Any, size: int) -> None:
        self.dataset, self.size = dataset, min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.dataset[index * len(self.dataset) // self.size]


def _reentrant_checkpointing_under_zero3(model: Any, args: TrainingArguments) -> TrainingArguments:
    """Activation checkpointing under ZeRO-3 must be reentrant (a copy of `args` says so).

    Non-reentrant checkpointing keeps live references to frozen parameters, which ZeRO-3 empties
    when a module's forward ends; the recompute then fails its shape check ("Recomputed values ...
    have different metadata"), a DeepSpeed bug that hits every peft model (frozen base). Reentrant
    checkpointing needs inputs that require grad, hence `enable_input_require_grads`.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    enabled, options = activation_checkpointing(args)
    if not (enabled and is_deepspeed_zero3_enabled()):
        return args
    if options.get("use_reentrant") is False:
        warnings.warn(
            "use_reentrant=False does not work with DeepSpeed ZeRO-3 and frozen parameters (a DeepSpeed "
            "bug): this trainer uses reentrant activation checkpointing instead.",
            stacklevel=3,
        )
    options["use_reentrant"] = True
    args = with_checkpointing_kwargs(args, options)
    if model is not None and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return args


class _TaskProgressInCheckpoints(TrainerCallback):
    """Adds every process's collected locator features and expert-usage counts to each Trainer
    checkpoint (rank 0 writes).

    An interrupted task then resumes with the features and usage its finished steps collected, so
    its locator is fitted on the same samples, and its usage statistics (CL-MoE's task gate and
    merge, later tasks' candidate experts) count the same steps as in an uninterrupted run.
    `on_save` runs on every process right after the Trainer wrote the checkpoint, which the gather
    needs.
    """

    def __init__(self, trainer: ContinualMoETrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        cmoe = self.trainer.continual_model
        buffer = cmoe.feature_buffer_in_use if cmoe is not None else None
        if buffer is None:
            return
        # the rows may live on the device: one copy to the host per checkpoint, not per step
        entry = None if len(buffer) == 0 else (buffer.tensor().cpu(), buffer.seen, buffer.random_state())
        gathered = gather_objects((cmoe.usage_state(), entry))  # one collective for both
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        counts = {
            f"rank{rank}/{layer}": value
            for rank, (usage, _) in enumerate(gathered)
            for layer, value in usage.items()
        }
        save_file(counts, os.path.join(folder, f"{USAGE_COUNTS}.safetensors"))
        kept = {rank: entry for rank, (_, entry) in enumerate(gathered) if entry is not None}
        save_file(
            {f"rank{rank}": rows for rank, (rows, _, _) in kept.items()},
            os.path.join(folder, f"{LOCATOR_FEATURES}.safetensors"),
        )
        meta: dict[str, Any] = {
            f"rank{rank}": {"seen": seen, "random_state": random} for rank, (_, seen, random) in kept.items()
        }
        meta[PROGRESS_DIGESTS] = {
            USAGE_COUNTS: shards.tensor_digest(counts),
            LOCATOR_FEATURES: shards.tensor_digest(
                {f"rank{rank}": rows for rank, (rows, _, _) in kept.items()}
            ),
        }
        # written last: a checkpoint without it was cut short (see `_last_complete_checkpoint`)
        write_atomically(os.path.join(folder, f"{LOCATOR_FEATURES}.json"), json.dumps(meta))


class ContinualMoETrainer(RouterAuxLossMixin, Trainer):
    """Trains a `ContinualMoEConfig` model (or a plain peft model, as a baseline) task by task.

    Use it like `transformers.Trainer`, without `train_dataset`; then call `train_tasks` with the
    whole stream, or `train_task` one task at a time (e.g. as tasks arrive over weeks).
    """

    def __init__(self, model: PeftModel | None = None, args: TrainingArguments | None = None, **kwargs: Any):
        if args is None:
            args = ContinualTrainingArguments(output_dir="cmoe_output")
        if isinstance(model, PeftModel) and model.peft_config[model.active_adapter].inference_mode:
            raise ValueError(
                "The model was loaded for inference: load it with is_trainable=True to train it."
            )
        self.hub_target: hub.HubTarget | None = None
        if args.push_to_hub:  # this trainer pushes one revision per finished task, not checkpoints
            self.hub_target = hub.HubTarget(
                repo_id=args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                token=args.hub_token,
                private=args.hub_private_repo,
                branch=args.hub_revision or "main",
            )
            args = copy.copy(args)
            args.push_to_hub = False
        args = _reentrant_checkpointing_under_zero3(model, args)
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(_TaskProgressInCheckpoints(self))
        self.continual_output_dir = args.output_dir
        self.result = ContinualResult()
        self._seen: dict[str, Task] = {}
        # the balancing loss summed on its device since the last log (None: nothing yet); read once per log

    # -- the model ------------------------------------------------------------------------------

    def _routing(self, name: str) -> contextlib.AbstractContextManager:
        cmoe = self.continual_model
        return cmoe.using_task(name) if cmoe is not None else contextlib.nullcontext()

    # -- the stream -----------------------------------------------------------------------------

    def train_tasks(
        self, tasks: Iterable[Task], resume_from_checkpoint: bool | None = None
    ) -> ContinualResult:
        """Train every task in order; returns (and keeps updating) `self.result`.

        With ``resume_from_checkpoint=True`` (or ``args.resume_from_checkpoint``), tasks already
        finished in ``output_dir`` are restored instead of trained again, and an interrupted task
        continues from its last checkpoint.
        """
        from tqdm.auto import tqdm

        tasks = list(tasks)
        resume = (
            self.args.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
        )
        if resume:
            self._restore_finished(tasks)
            self.push_pending()
        self._validate([task for task in tasks if task.name not in self.result.tasks])
        progress = tqdm(
            total=len(tasks),
            initial=len(self.result.tasks),
            desc="tasks",
            unit="task",
            disable=self.args.disable_tqdm or not self.is_world_process_zero(),
        )
        with progress:
            for task in tasks:
                if task.name in self.result.tasks:
                    self._seen.setdefault(task.name, task)
                    continue
                progress.set_postfix_str(task.name)
                self.train_task(task, resume_from_checkpoint=bool(resume))
                progress.update()
        return self.result

    def train_task(self, task: Task, resume_from_checkpoint: bool = False) -> ContinualResult:
        """Add, train, locate, evaluate and save one task (see the module docstring)."""
        self._validate([task])
        cmoe = self.continual_model
        log: dict[str, Any] = {"task": task.name}
        self._seen[task.name] = task
        task_dir = os.path.join(self.continual_output_dir, CHECKPOINTS_DIR, task.name)
        checkpoint = self._last_complete_checkpoint(task_dir) if resume_from_checkpoint else None
        self._seed_task(len(self._seen) - 1)
        with self._task_arguments(task):
            if cmoe is None:  # a plain peft model (the sequential-LoRA baseline): train, nothing else
                output = self._run_training(task.train_dataset, task_dir, checkpoint)
                log.update({"train_loss": output.training_loss, **output.metrics})
            else:  # the model's own task lifecycle (`lifecycle`), driven by this Trainer's loop
                if cmoe.needs_probe(task.name):
                    self._probe(task)
                with cmoe.learning_task(task.name, progress=not self.args.disable_tqdm) as session:
                    if checkpoint is not None:
                        self._load_task_progress(checkpoint, session.features)
                    output = self._run_training(task.train_dataset, task_dir, checkpoint)
                log.update({"train_loss": output.training_loss, **output.metrics, **session.log})
        self._finish_task(task, log)
        return self.result

    @contextlib.contextmanager
    def _task_arguments(self, task: Task):
        """The task's own `training_args` on top of the stream's, for as long as it trains."""
        saved = {name: getattr(self.args, name) for name in task.training_args}
        try:
            for name, value in task.training_args.items():
                setattr(self.args, name, value)
            set_train_batch_size(self)
            yield
        finally:
            for name, value in saved.items():
                setattr(self.args, name, value)
            set_train_batch_size(self)

    def _seed_task(self, index: int) -> None:
        """Seed every random generator from ``args.seed`` and the task's position in the stream.

        What a task draws (data order, dropout, ...) then depends on nothing that ran before it,
        so a task restarted after a crash (resumed with no checkpoint of its own) trains exactly as
        it did in an uninterrupted run; a resumed checkpoint restores the generators it saved.
        """
        seed = self.args.seed + 1_000_003 * index
        if self.args.full_determinism:
            enable_full_determinism(seed)
        else:
            set_seed(seed)

    def _run_training(self, dataset: Any, output_dir: str, checkpoint: str | None = None, **overrides: Any):
        """One `Trainer.train` on `dataset` with a fresh optimizer, scheduler and model wrapper."""
        self.train_dataset = dataset
        self.optimizer, self.lr_scheduler = None, None
        # a fresh DDP/FSDP/DeepSpeed wrapper too: an old one does not know the new task's parameters
        self.model_wrapped = self.model
        saved = {name: getattr(self.args, name) for name in ("output_dir", *overrides)}
        for name, value in {"output_dir": output_dir, **overrides}.items():
            setattr(self.args, name, value)
        try:
            return super().train(resume_from_checkpoint=checkpoint)
        finally:
            for name, value in saved.items():
                setattr(self.args, name, value)

    def _probe(self, task: Task) -> None:
        """LLaVA-CMoE's probe phase, on a share of the task's data (the model keeps the decision)."""
        cmoe = self.continual_model
        share = cmoe.peft_config[cmoe.active_adapters[0]].expansion_probe_fraction
        subset = _Subset(task.train_dataset, max(1, math.ceil(share * len(task.train_dataset))))
        steps = math.ceil(share * self.args.max_steps) if self.args.max_steps > 0 else -1
        with cmoe.probing_task(task.name):
            self._run_training(
                subset,
                os.path.join(self.continual_output_dir, CHECKPOINTS_DIR, f"{task.name}.probe"),
                max_steps=steps,
                num_train_epochs=1,
                save_strategy=SaveStrategy.NO,
            )

    def _finish_task(self, task: Task, log: dict[str, Any]) -> None:
        evaluation = self.evaluate_seen_tasks()
        result, row, confusion = self.result, evaluation.scores, evaluation.confusion
        result.tasks.append(task.name)
        result.accuracy_matrix.append(row)
        result.task_metrics = ["custom" if seen.evaluate else seen.metric for seen in self._seen.values()]
        if evaluation.oracle is not None:
            result.oracle_accuracy_matrix = [*(result.oracle_accuracy_matrix or []), evaluation.oracle]
        result.locator_confusion = confusion
        result.task_logs.append(log)
        self._save_task(task.name)
        metrics = {f"continual/acc/{name}": value for name, value in zip(result.tasks, row, strict=False)}
        metrics.update({f"continual/{k}": v for k, v in result.summary().items() if v is not None})
        if confusion is not None:
            per_task = result.locator_accuracy_per_task
            metrics.update({f"continual/locator_accuracy/{name}": share for name, share in per_task.items()})
        self.log({k: v for k, v in metrics.items() if v is not None})

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate_seen_tasks(self) -> SeenTasksEvaluation:
        """Score every task seen so far with its task located (and true, with ``eval_oracle``).

        What runs after each task; its row goes into the accuracy matrix (`evaluation`).
        """
        return evaluate_seen_tasks(
            self.model,
            {name: seen.eval_dataset for name, seen in self._seen.items()},
            self._score,
            collator=self.data_collator,
            batch_size=self._eval_batch_size(),
            oracle=getattr(self.args, "eval_oracle", False),
        )

    def _eval_batch_size(self) -> int:
        return self.args.eval_batch_size or self.args.per_device_eval_batch_size

    def _score(self, name: str, records: Any) -> float:
        """The task's own `evaluate`, or generated answers scored by normalised exact match."""
        task = self._seen[name]
        if task.evaluate is not None:
            return float(task.evaluate(self.model, records))
        return generated_score(
            self.model,
            records,
            self.data_collator,
            self._decode,
            task.metric,
            batch_size=self._eval_batch_size(),
            max_new_tokens=task.training_args.get(
                "eval_max_new_tokens", getattr(self.args, "eval_max_new_tokens", 16)
            ),
        )

    def _decode(self, tokens: torch.Tensor) -> list[str]:
        return self.processing_class.batch_decode(tokens, skip_special_tokens=True)

    # -- saving and resuming --------------------------------------------------------------------

    def _save_task(self, name: str) -> None:
        """``output_dir/<task>`` gets the adapter after this task; results.json the matrix so far.

        With ``push_to_hub``, the saved folder is then pushed as the task's revision.
        """
        root = self.continual_output_dir
        final = os.path.join(root, name)
        staging = os.path.join(root, f".{name}.saving")
        with zero3.gathered(zero3.adapter_parameters(self.model)):  # collective under ZeRO-3
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
                self.model.save_pretrained(staging)
        if self.args.should_save:
            config = self.model.peft_config[self.model.active_adapter]
            repo_id = self.hub_target.repo_id if self.hub_target is not None else None
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(hub.model_card(config, self.result, repo_id, name))
            if os.path.exists(final):
                retired = os.path.join(root, f".{name}.old")
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(final, retired)
                os.replace(staging, final)
                shutil.rmtree(retired)
            else:
                os.replace(staging, final)
            self.result.save(root)
            if self.hub_target is not None:
                hub.write_pending(root, [*hub.read_pending(root), name])
                self.push_pending()
        self.accelerator.wait_for_everyone()

    def push_pending(self) -> list[str]:
        """Push every finished task whose push has not succeeded yet; returns those still pending.

        A push that fails warns and leaves the task pending (the local save is untouched); call
        this again later, or resume the stream, to retry.
        """
        if self.hub_target is None or not self.args.should_save:
            return []
        root = self.continual_output_dir
        report = hub.push_finished(self.hub_target, root, hub.read_pending(root), self.result.tasks)
        if report.failure is not None:  # a push must never stop training or lose the local save
            task, error = report.failure
            warnings.warn(
                f"Pushing task {task!r} to {self.hub_target.repo_id} failed ({type(error).__name__}: "
                f"{error}). The local save in {os.path.join(root, task)} is intact; call "
                "trainer.push_pending() or resume the stream to retry.",
                stacklevel=2,
            )
        return report.pending

    def _restore_finished(self, tasks: Sequence[Task]) -> None:
        """Bring back every finished task (weights, routers, locators, results) from output_dir."""
        root = self.continual_output_dir
        if not os.path.exists(os.path.join(root, "results.json")):
            return
        saved = ContinualResult.load(root)
        names = [task.name for task in tasks]
        if saved.tasks != names[: len(saved.tasks)]:
            raise ValueError(
                f"{root} holds the results of tasks {saved.tasks}, which do not start the stream {names}: "
                "use another output_dir or the same task order."
            )
        if not saved.tasks:
            return
        last = os.path.join(root, saved.tasks[-1])
        cmoe = self.continual_model
        if cmoe is not None:
            cmoe.replay_tasks(PeftConfig.from_pretrained(last))
            shards.remember_source(cmoe._config, last)  # the finished tasks' shard files are there
            shards.check_main_file(cmoe._config)  # a clear error before peft reads a damaged file
        self.model.load_adapter(last, adapter_name=self.model.active_adapter, is_trainable=True)
        self.result = saved
        by_name = {task.name: task for task in tasks}
        self._seen = {name: by_name[name] for name in saved.tasks}

    def _last_complete_checkpoint(self, task_dir: str) -> str | None:
        """The newest checkpoint of a task that was written to the end, its files verified.

        A kill while the Trainer wrote a checkpoint leaves it without the task's progress files
        (written last, by `_TaskProgressInCheckpoints`): the one before it is resumed instead, as
        if the kill had come a little earlier. A damaged checkpoint is an `AdapterFileError`.
        """
        if not os.path.isdir(task_dir) or self.continual_model is None:
            return get_last_checkpoint(task_dir) if os.path.isdir(task_dir) else None
        prefix = f"{PREFIX_CHECKPOINT_DIR}-"
        steps = sorted(
            (int(name[len(prefix) :]), name)
            for name in os.listdir(task_dir)
            if name.startswith(prefix) and name[len(prefix) :].isdigit()
        )
        for _, name in reversed(steps):
            checkpoint = os.path.join(task_dir, name)
            if not os.path.isfile(os.path.join(checkpoint, f"{LOCATOR_FEATURES}.json")):
                continue  # cut short
            try:  # under DeepSpeed the weights may be only in the engine's own files
                if os.path.isfile(os.path.join(checkpoint, shards.MAIN_FILE)):
                    shards.verify_adapter(checkpoint)
                self._read_task_progress(checkpoint)
            except AdapterFileError as error:
                raise AdapterFileError(
                    f"{error} It is the Trainer checkpoint {checkpoint} of the interrupted task: delete that "
                    "folder to resume from the checkpoint before it (or from the task's start)."
                ) from None
            return checkpoint
        return None

    def _read_task_progress(self, checkpoint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict]:
        """A checkpoint's expert-usage counts, locator features and their meta, checked by digest."""
        stem = os.path.join(checkpoint, LOCATOR_FEATURES)
        with open(f"{stem}.json", encoding="utf-8") as handle:
            meta = json.load(handle)
        loaded = {}
        for kind, path in ((USAGE_COUNTS, os.path.join(checkpoint, f"{USAGE_COUNTS}.safetensors")),
                           (LOCATOR_FEATURES, f"{stem}.safetensors")):  # fmt: skip
            try:
                loaded[kind] = load_file(path)
            except Exception as error:  # missing, truncated, damaged header
                raise AdapterFileError(f"{path} cannot be read ({type(error).__name__}: {error}).") from None
            expected = meta.get(PROGRESS_DIGESTS, {}).get(kind)
            if expected is not None and shards.tensor_digest(loaded[kind]) != expected:
                raise AdapterFileError(f"{path} is damaged: its tensors do not match their digest.")
        return loaded[USAGE_COUNTS], loaded[LOCATOR_FEATURES], meta

    def _load_task_progress(self, checkpoint: str, buffer: FeatureBuffer) -> None:
        """This process's locator features and usage counts from a checkpoint of the running task."""
        key = f"rank{self.args.process_index}"
        counts, features, meta = self._read_task_progress(checkpoint)
        prefix = f"{key}/"
        mine = {name[len(prefix) :]: value for name, value in counts.items() if name.startswith(prefix)}
        self.continual_model.restore_usage(mine)
        if key in meta:
            buffer.restore(features[key], meta[key]["seen"], meta[key]["random_state"])

    # -- optimizer ------------------------------------------------------------------------------

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer without empty parameter groups under DeepSpeed.

        A LoRA adapter has nothing for the Trainer's no-weight-decay group, and DeepSpeed's engine
        drops empty groups from the optimizer it is given. transformers 5.0 builds the scheduler on
        that optimizer before the engine does (its scheduler then steps one group too many and
        fails at the first step); newer releases build it afterwards. Dropping them here suits both.
        The signature is ``()`` in transformers 5.0 and ``(model=None)`` later, hence the passthrough.
        """
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.is_deepspeed_enabled and isinstance(optimizer, torch.optim.Optimizer):  # not a DummyOptim
            optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    # -- loss and logs --------------------------------------------------------------------------

    # -- input checks ---------------------------------------------------------------------------

    def _check_task_arguments(self, task: Task) -> None:
        unknown = sorted(set(task.training_args) - set(PER_TASK_ARGUMENTS))
        if unknown:
            raise ValueError(
                f"Task {task.name!r}: training_args may set {', '.join(PER_TASK_ARGUMENTS)}; not {unknown} "
                "(the other arguments hold for the whole stream: set them in the trainer's args)."
            )
        batch = [name for name in BATCH_ARGUMENTS if name in task.training_args]
        if batch and self.is_deepspeed_enabled:
            raise ValueError(
                f"Task {task.name!r}: a per-task {' and '.join(batch)} cannot be combined with DeepSpeed, "
                "which fixes the batch in its config when the arguments are built; train every task "
                "with one batch size, or without DeepSpeed (DDP)."
            )

    def _validate(self, tasks: Sequence[Task]) -> None:
        """Refuse a stream that would fail later, before any training starts."""
        if self.is_fsdp_enabled:
            raise ValueError(
                "ContinualMoETrainer does not support FSDP. Between tasks it grows, merges and saves "
                "adapter weights that FSDP keeps sharded, and FSDP2 would leave the parameters a new task "
                "adds unsharded (their gradients never synchronised). Use DeepSpeed ZeRO-3 for the same "
                "parameter sharding (supported across tasks), or ZeRO-2 / DDP; see docs/distributed.md."
            )
        names = [task.name for task in tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Duplicate task names in the stream: {duplicates}.")
        cmoe = self.continual_model
        for task in tasks:
            if not isinstance(task, Task):
                raise TypeError(f"Expected cmoe_adapters.Task objects, got {type(task).__name__}.")
            validate_task_name(task.name)
            self._check_task_arguments(task)
            if task.name in self.result.tasks or (cmoe is not None and task.name in cmoe.tasks[:-1]):
                raise ValueError(f"Task {task.name!r} was already trained; task names must be unique.")
            self._check_dataset(task, "train_dataset", task.train_dataset)
            if task.eval_dataset is None:
                warnings.warn(
                    f"Task {task.name!r} has no eval_dataset: its column of the accuracy matrix stays empty.",
                    stacklevel=3,
                )
                continue
            self._check_dataset(task, "eval_dataset", task.eval_dataset)
            if task.evaluate is None:
                try:
                    lacking = get_scorer(task.metric).missing()
                except ValueError as error:
                    raise ValueError(f"Task {task.name!r}: {error}") from None
                if lacking:  # found now, not after the task's training
                    raise ImportError(f"Task {task.name!r}: {lacking}.")
            if task.evaluate is None and not (
                hasattr(self.data_collator, "generation_inputs")
                and hasattr(self.processing_class, "batch_decode")
            ):
                raise ValueError(
                    f"Task {task.name!r} has no evaluate= function, and the default evaluator needs a "
                    "data_collator with generation_inputs() (e.g. cmoe_adapters.data.VisionLanguageCollator) "
                    "and a processing_class that can batch_decode."
                )

    def _check_dataset(self, task: Task, kind: str, dataset: Any) -> None:
        try:
            size = len(dataset)
        except TypeError:
            raise TypeError(f"Task {task.name!r}: {kind} must be a sized data set (len() works).") from None
        if size == 0:
            raise ValueError(f"Task {task.name!r}: {kind} is empty.")
        config = getattr(self.model, "config", None)
        if getattr(config, "vision_config", None) is None:
            return
        # records without an image are text-only questions (ScienceQA has some); a data set in
        # which none has one was loaded without its images
        checked = [dataset[index] for index in range(min(size, 256))]
        vqa = [r for r in checked if isinstance(r, Mapping) and ("question" in r or "conversations" in r)]
        if vqa and all(record.get("image") is None for record in vqa):
            raise ValueError(
                f"Task {task.name!r}: no record of {kind} has an image (of the first {len(checked)}), but "
                "the model is a vision-language model. Give the records an 'image' (a PIL image or a path)."
            )
