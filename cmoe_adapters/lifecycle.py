"""A task's whole life on the model, for any training loop: probe (if the method asks), learn, finish.

Every preset runs in a plain PyTorch loop with these two blocks and no private name::

    for name, loader in stream:
        if model.needs_probe(name):             # LLaVA-CMoE's expansion, after the first task
            with model.probing_task(name):
                train(model, probe_loader)      # a share of the task's data, with the balancing loss
        with model.learning_task(name) as task:
            train(model, loader)                # loss = out.loss + model.router_aux_loss()
        print(task.log)                         # what finishing did: expansion, momentum, locator

Inside `learning_task` every forward pass routes through the task, collects its locator features
and counts its expert usage. Leaving the block normally finishes the task: its usage becomes its
statistics (CL-MoE's task gate), CL-MoE's momentum merge runs, its locator is fitted on the
features of every process, and the adapter is frozen. Leaving it by an exception finishes nothing,
so an interrupted task can be resumed. `ContinualMoETrainer` is a driver over the same blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import expansion, momentum
from .locator import FeatureBuffer

if TYPE_CHECKING:
    from .model import ContinualMoEModel


@dataclass
class TaskSession:
    """One task being learnt (what `learning_task` yields).

    ``features`` is the buffer its forward passes fill (a resumed run may restore it), ``log``
    collects what adding and finishing the task did, for the task's results.
    """

    name: str
    features: FeatureBuffer
    log: dict[str, Any] = field(default_factory=dict)


def gather_objects(value: Any) -> list[Any]:
    """`value` from every process, in rank order (just ``[value]`` without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def gather_rows(features: torch.Tensor) -> torch.Tensor:
    """All processes' locator features, concatenated in rank order (identical on every rank)."""
    return torch.cat(gather_objects(features.cpu()))


def needs_probe(model: ContinualMoEModel, name: str) -> bool:
    """Whether task `name` must run `probing_task` before `learning_task` (LLaVA-CMoE's expansion)."""
    return bool(
        model._config.expansion
        and model.tasks
        and name not in model.tasks
        and name not in model._expansion_plans
    )


@contextlib.contextmanager
def probing_task(model: ContinualMoEModel, name: str) -> Iterator[str]:
    """LLaVA-CMoE's probe phase for task `name`: train inside this block, on a share of its data.

    Temporary probe experts and a probe router are added (old experts frozen); leaving the block
    measures where the probes were used, removes them and keeps the expansion decision for
    `learning_task(name)`. Yields the probe's (temporary) task name. An exception removes the probe.
    """
    if not needs_probe(model, name):
        raise ValueError(
            f"Task {name!r} needs no probe phase: only a new task after the first, with expansion=True, "
            "and once (use model.needs_probe(name) to ask)."
        )
    probe = expansion.start_probe(model)
    try:
        with model.using_task(probe), model.tracking_usage():
            yield probe
        model._expansion_plans[name] = expansion.finish_probe(model)
    except BaseException:
        if probe in model.tasks:
            model.remove_last_task()
        raise


@contextlib.contextmanager
def learning_task(model: ContinualMoEModel, name: str, progress: bool = False) -> Iterator[TaskSession]:
    """Add task `name` (unless a resumed run added it already), learn it inside the block, finish it."""
    log: dict[str, Any] = {}
    if name not in model.tasks:
        if needs_probe(model, name):
            raise ValueError(
                f"expansion=True: task {name!r} first needs its probe phase, `with model.probing_task("
                f"{name!r}): <train on a share of its data>`, which decides where it gets new experts."
            )
        plan = model._expansion_plans.pop(name, {})
        model.add_task(name, **plan)
        if plan:
            log["expansion"] = {
                k: v for k, v in plan["details"]["expansion"].items() if k != "probe_frequencies"
            }
    config = model._config
    before = momentum.snapshot_old_experts(model) if config.momentum_merge else None
    with model.using_task(name), model.collecting_locator_features(name) as buffer, model.tracking_usage():
        session = TaskSession(name, buffer, log)
        yield session
    # every task's usage is kept: CL-MoE's gates and merge read it, and later tasks' routers reach
    # first the old experts earlier tasks used most
    model.record_usage(name)
    if before:
        log["momentum"] = momentum.merge_newest_task(model, before)
    features = gather_rows(buffer.tensor())
    log["locator"] = vars(model.fit_locator(name, features=features, progress=progress))
    model.freeze()
