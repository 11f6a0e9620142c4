"""Expert usage: how often each task's tokens chose each expert (CL-MoE's task gate, router order).

A mixin of `ContinualMoEModel`. Inside `tracking_usage` every adapted layer counts the top-k
assignments of its tokens; `record_usage` stores the share, summed over all processes, as the
task's usage in every layer, where CL-MoE's gate and momentum merge read it and later tasks'
routers reach first the experts earlier tasks used most.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch


def _all_reduce(counts: torch.Tensor) -> torch.Tensor:
    """Sum a statistic over all processes (unchanged without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.clone()
        torch.distributed.all_reduce(counts)
    return counts


class ExpertUsage:
    """Counting, checkpointing and recording every layer's expert assignments."""

    @contextlib.contextmanager
    def tracking_usage(self) -> Iterator[None]:
        """Inside this block every layer counts the top-k expert assignments of its tokens."""
        for layer in self._layers():
            layer.usage_counts.clear()
        self._routing.track_usage = True
        try:
            yield
        finally:
            self._routing.track_usage = False

    def usage_counts(self) -> dict[str, torch.Tensor]:
        """Assignments counted per layer since `tracking_usage` began, summed over all processes."""
        adapter_name = self.active_adapters[0]
        counts = {}
        for layer in self._layers():
            value = layer.usage_counts.get(adapter_name)
            if value is None:
                value = torch.zeros(layer.cmoe_experts[adapter_name].num_experts, dtype=torch.float64)
            counts[layer.layer_name] = _all_reduce(value)
        return counts

    def usage_state(self) -> dict[str, torch.Tensor]:
        """This process's assignments counted so far per layer (saved in checkpoints to resume)."""
        adapter_name = self.active_adapters[0]
        state = {}
        for layer in self._layers():
            value = layer.usage_counts.get(adapter_name)
            if value is not None:
                state[layer.layer_name] = value.detach().cpu()
        return state

    def restore_usage(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue counting from `usage_state()`'s answer (a resumed task counts its earlier steps)."""
        adapter_name = self.active_adapters[0]
        for layer in self._layers():
            value = state.get(layer.layer_name)
            if value is not None:
                device = layer.get_base_layer().weight.device
                layer.usage_counts[adapter_name] = value.to(device, torch.float64)

    def record_usage(self, task: str | None = None) -> None:
        """Store the counted usage as the task's expert-usage share in every layer (CL-MoE's G^T)."""
        index = self.task_index(task if task is not None else self.tasks[-1])
        adapter_name = self.active_adapters[0]
        counts = self.usage_counts()
        for layer in self._layers():
            routers = layer.cmoe_routers[adapter_name]
            share = counts[layer.layer_name][: routers.num_experts(index)]
            routers.set_usage(index, share / share.sum().clamp_min(1e-12))
