"""The task registry: the ordered tasks of the adapter, their weights' birth and freezing.

A mixin of `ContinualMoEModel` (it uses the tuner's ``_config``, ``_layers()``,
``active_adapters`` and the locator slots of `LocatorControl`). Tasks live in the adapter's
config (``task_records``), so a saved adapter rebuilds the same structure (`replay_tasks`).
A task's whole life for any training loop (probe, learn, finish) is in `lifecycle`; the
methods here are its entry points on the model.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from . import zero3
from .config import ContinualMoEConfig, validate_task_name


def _init_generator(seed: int, task: int, layer_name: str) -> torch.Generator:
    """The CPU generator of one layer's new weights for task `task`: a function of its arguments only."""
    mixed = (seed * 1_000_003 + task) * 4_294_967_311 + zlib.crc32(layer_name.encode())
    return torch.Generator().manual_seed(mixed % 2**63)  # any init_seed: manual_seed takes 64 bits


class TaskRegistry:
    """Adding, removing, replaying and freezing tasks, and routing through one (`using_task`)."""

    _default_task: str | None
    _expansion_plans: dict[str, dict[str, Any]]

    @property
    def tasks(self) -> list[str]:
        """Task names, in the order they were learnt."""
        return self._config.task_names

    def task_index(self, name: str) -> int:
        """Position of task `name`; a `KeyError` lists the known tasks if it is unknown."""
        try:
            return self.tasks.index(name)
        except ValueError:
            known = ", ".join(repr(t) for t in self.tasks) or "none yet (call add_task first)"
            raise KeyError(f"Unknown task {name!r}. Known tasks: {known}.") from None

    def add_task(
        self,
        name: str,
        *,
        expanded_layers: Sequence[str] | None = None,
        init_from: Mapping[str, Sequence[int]] | None = None,
        preferred_experts: Mapping[str, Sequence[int]] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Start a new task: freeze all earlier experts and routers, add its experts and router.

        Only the new task's router (in every adapted layer) and the experts it adds get gradients
        afterwards (every expert, with ``freeze_old_experts=False``). Create the optimizer after
        calling this. `expanded_layers` limits new experts to those layers, `init_from` names per
        layer the existing experts to copy into them, `preferred_experts` ranks per layer the old
        experts its router should reach first (at most ``router_max_experts`` in all), `details` is
        stored in the task's record (probe-guided expansion passes its decision here).
        """
        validate_task_name(name)
        if name in self.tasks:
            raise ValueError(f"Task {name!r} already exists. Known tasks: {self.tasks}.")
        if self._config.inference_mode:
            raise ValueError(
                "This adapter was loaded for inference; load it with PeftModel.from_pretrained(..., "
                "is_trainable=True) to add tasks."
            )
        record: dict[str, Any] = {"name": name, "router_max_experts": self._config.router_max_experts}
        if expanded_layers is not None:
            unknown = sorted(set(expanded_layers) - {layer.layer_name for layer in self._layers()})
            if unknown:
                raise ValueError(f"expanded_layers names layers that are not adapted: {unknown[:5]}.")
            record["expanded_layers"] = sorted(expanded_layers)
        if init_from:
            record["init_from"] = {layer: list(experts) for layer, experts in init_from.items()}
        if details:
            record.update(details)
        self._grow(record, preferred_experts)

    def _grow(self, record: dict[str, Any], preferred: Mapping[str, Sequence[int]] | None = None) -> None:
        """Append a task record and build what it adds in every layer (and its locator slot)."""
        adapter_name = self.active_adapters[0]
        config = self._config
        config.task_records.append(record)
        task = len(config.task_records) - 1
        init_from = record.get("init_from", {})
        for layer in self._layers():
            count = config.new_experts_for(task, layer.layer_name)
            copies = init_from.get(layer.layer_name)
            copies = list(copies)[:count] if copies and count else None
            # new experts concatenate or copy old ones, which ZeRO-3 may hold partitioned
            with zero3.gathered(layer.cmoe_experts[adapter_name].parameters()):
                layer.add_task(
                    adapter_name,
                    count,
                    init_from=copies,
                    max_experts=config.router_experts_for(task),
                    preferred=list((preferred or {}).get(layer.layer_name, [])),
                    generator=_init_generator(config.init_seed, task, layer.layer_name),
                )
            layer.set_trainable_task(adapter_name, task)
        if config.locator_feature_dim is not None:
            self._add_locator_slots(adapter_name, 1)

    def remove_last_task(self) -> dict[str, Any]:
        """Undo the newest `add_task` entirely (used to roll back probe experts); returns its record."""
        adapter_name = self.active_adapters[0]
        config = self._config
        if not config.task_records:
            raise ValueError("There is no task to remove.")
        previous = len(config.task_records) - 2  # the task that becomes the newest again
        for layer in self._layers():
            layer.remove_last_task(adapter_name)
            layer.set_trainable_task(adapter_name, previous if previous >= 0 else None)
        locator = self._locator
        if len(locator) == len(config.task_records):
            locator.remove_last()
        return config.task_records.pop()

    def freeze(self) -> None:
        """No parameter of the adapter gets gradients (done once a task is finished)."""
        for layer in self._layers():
            layer.set_trainable_task(self.active_adapters[0], None)

    def replay_tasks(self, saved: ContinualMoEConfig) -> None:
        """Grow this model to the task structure of a saved config whose tasks extend ours.

        Used to resume: the weights can then be loaded with ``PeftModel.load_adapter``, after
        ``shards.remember_source(config, path)`` tells it where the finished tasks' shards are.
        """
        saved_names = saved.task_names
        if saved_names[: len(self.tasks)] != self.tasks:
            raise ValueError(
                f"The saved tasks {saved_names} do not continue this model's tasks {self.tasks}."
            )
        config = self._config
        if saved.locator_feature_dim is not None and config.locator_feature_dim is None:
            config.locator_feature_dim = saved.locator_feature_dim
            self._add_locator_slots(self.active_adapters[0], len(self.tasks))
        for record in saved.task_records[len(self.tasks) :]:
            self._grow(dict(record))

    def needs_probe(self, name: str) -> bool:
        """Whether task `name` must run `probing_task` before `learning_task` (LLaVA-CMoE's expansion)."""
        from . import lifecycle

        return lifecycle.needs_probe(self, name)

    def probing_task(self, name: str) -> contextlib.AbstractContextManager[str]:
        """LLaVA-CMoE's probe phase of task `name`: train inside the block on a share of its data."""
        from . import lifecycle

        return lifecycle.probing_task(self, name)

    def learning_task(self, name: str, progress: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Add task `name`, learn it inside the block (any loop), finish it on leaving (`lifecycle`)."""
        from . import lifecycle

        return lifecycle.learning_task(self, name, progress=progress)

    @contextlib.contextmanager
    def using_task(self, name: str) -> Iterator[None]:
        """Route every forward/generate that gives no ``task=`` through task `name` (not located).

        The trainer trains each task inside this block; it also gives oracle-task evaluation.
        """
        self.task_index(name)
        previous, self._default_task = self._default_task, name
        try:
            yield
        finally:
            self._default_task = previous
