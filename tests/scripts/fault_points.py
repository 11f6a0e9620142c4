"""Kill points for the fault-injection tests: SIGKILL this process at a named moment of a task's life.

A fault is ``PHASE:TASK[:N]``:

* ``add:T``          right after task T was added to the model (new experts and router exist, nothing saved);
* ``probe:T:N``      at step N of T's probe phase (LLaVA-CMoE's expansion);
* ``train:T:N``      at training step N of task T (before or after its first checkpoint);
* ``checkpoint:T:N`` while task T's checkpoint of step N is written (the Trainer's files are, the task's
                     progress files are not);
* ``locator:T``      as T's task locator starts fitting;
* ``eval:T:N``       at the N-th task scored in the evaluation after T;
* ``staged:T``       after T's adapter was saved to its staging folder, before it replaces the last one;
* ``saved:T``        after T's folder was replaced, before ``results.json`` names T;
* ``push:T``         in the middle of T's push to the Hub (its commit made, its tag not yet).

Each fault fires once: its name is appended to ``<output_dir>/faults_fired`` (flushed to disk) just
before the SIGKILL, so a resumed run with the same list goes on to the next one. SIGKILL runs no
handler, no ``finally`` and no buffered write: it is the same as a kill from outside at that moment.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback

import cmoe_adapters.model
import cmoe_adapters.trainer
from cmoe_adapters import hub
from cmoe_adapters.locator import TaskLocator
from cmoe_adapters.results import ContinualResult

PHASES = ("add", "probe", "train", "checkpoint", "locator", "eval", "staged", "saved", "push")


class Faults:
    """The faults of one run still to fire, and the hooks that fire them."""

    def __init__(self, faults: Sequence[str], output_dir: str) -> None:
        self.record = os.path.join(output_dir, "faults_fired")
        fired = set()
        if os.path.exists(self.record):
            with open(self.record, encoding="utf-8") as handle:
                fired = set(handle.read().split())
        self.armed = [fault for fault in faults if fault not in fired]
        for fault in self.armed:
            if fault.split(":")[0] not in PHASES:
                raise ValueError(f"unknown fault phase in {fault!r}; phases: {PHASES}")
        self.trainer: Any = None
        self.scored = 0

    def reached(self, phase: str, task: str, count: int | None = None) -> None:
        """SIGKILL now if the next armed fault is this moment."""
        if not self.armed:
            return
        wanted = self.armed[0].split(":")
        if wanted[0] != phase or wanted[1] != task or (count is not None and int(wanted[2]) != count):
            return
        os.makedirs(os.path.dirname(self.record), exist_ok=True)
        with open(self.record, "a", encoding="utf-8") as handle:
            handle.write(self.armed[0] + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> list[TrainerCallback]:
        """Wrap the library at each moment; returns the Trainer callback for the step faults."""
        faults = self

        def after(owner: Any, name: str, moment: Callable[..., None]) -> None:
            original = getattr(owner, name)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                output = original(*args, **kwargs)
                moment(*args, **kwargs)
                return output

            setattr(owner, name, wrapper)

        def before(owner: Any, name: str, moment: Callable[..., None]) -> None:
            original = getattr(owner, name)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                moment(*args, **kwargs)
                return original(*args, **kwargs)

            setattr(owner, name, wrapper)

        progress = cmoe_adapters.trainer._TaskProgressInCheckpoints
        before(
            progress,
            "on_save",
            lambda self, args, state, control, **_: faults.reached(
                "checkpoint", os.path.basename(os.path.normpath(args.output_dir)), state.global_step
            ),
        )
        model_class = cmoe_adapters.model.ContinualMoEModel
        after(model_class, "add_task", lambda self, name, **_: faults.reached("add", name))
        before(TaskLocator, "fit", lambda self, index, name, *a, **k: faults.reached("locator", name))

        def scoring(trainer: Any, name: str, records: Any) -> None:
            faults.scored += 1
            faults.reached("eval", trainer.continual_model.tasks[-1], faults.scored)

        trainer_class = cmoe_adapters.trainer.ContinualMoETrainer
        before(trainer_class, "_score", scoring)
        original_finish = trainer_class._finish_task

        def finish(trainer: Any, task: Any, log: Any) -> None:
            faults.scored = 0
            faults.trainer = trainer
            return original_finish(trainer, task, log)

        trainer_class._finish_task = finish
        # the trainer writes the model card into the staging folder once the adapter is saved there
        after(hub, "model_card", lambda config, result, repo_id, task: faults.reached("staged", task))
        before(ContinualResult, "save", lambda self, *a, **k: faults.reached("saved", self.tasks[-1]))
        after(
            hub.HubTarget,
            "_commit_changes",
            lambda self, api, folder, revision, message: faults.reached(
                "push", os.path.basename(os.path.normpath(folder))
            ),
        )
        return [_StepFaults(self)]


class _StepFaults(TrainerCallback):
    """``train:T:N`` and ``probe:T:N``: the output_dir of the Trainer names the task and phase."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.basename(os.path.normpath(args.output_dir))
        if folder.endswith(".probe"):
            self.faults.reached("probe", folder[: -len(".probe")], state.global_step)
        else:
            self.faults.reached("train", folder, state.global_step)
