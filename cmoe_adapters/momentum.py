"""CL-MoE's momentum merge of experts between tasks.

After task ``t`` every expert is blended with its value from before the task:

    theta_e <- lambda_e * theta_e(before t) + (1 - lambda_e) * theta_e(after t)

``lambda_e`` follows the expert's role, read from expert-usage statistics: an expert that earlier
tasks also use keeps mostly its old knowledge (``momentum_shared``, 0.7 in the reference), an
expert that only the new task uses takes mostly the new (``momentum_new``, 0.3), and an expert the
new task does not use is left as it is (``lambda = 1``; it received no gradient anyway). Routers
are not merged.

The reference script never fires (its parameter-name match fails) and, with 4 experts, its
"top 8 experts" rule leaves the exclusive set always empty; here an expert counts as *used* by a
task when its share of the task's top-k assignments is at least ``threshold / E``, so the roles
are decided for any number of experts.
"""

from __future__ import annotations

from typing import Any

import torch

from . import zero3
from .model import ContinualMoEModel

Snapshot = dict[str, tuple[torch.Tensor, torch.Tensor]]


def expert_roles(
    new_usage: torch.Tensor, old_usage: torch.Tensor | None, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(used_by_new, used_by_old)`` boolean masks over the experts the new task can see."""
    num_experts = new_usage.shape[0]
    floor = threshold / num_experts
    used_by_new = new_usage / new_usage.sum().clamp_min(1e-12) >= floor
    if old_usage is None or old_usage.sum() <= 0:
        return used_by_new, torch.zeros_like(used_by_new)
    old = torch.nn.functional.pad(old_usage, (0, num_experts - old_usage.shape[0]))
    used_by_old = old / old.sum() >= floor
    return used_by_new, used_by_old


def momentum_coefficients(
    new_usage: torch.Tensor, old_usage: torch.Tensor | None, shared: float, new: float, threshold: float
) -> torch.Tensor:
    """``lambda_e`` per expert: shared with old tasks -> `shared`, new task only -> `new`, else 1."""
    used_by_new, used_by_old = expert_roles(new_usage, old_usage, threshold)
    keep = torch.ones(new_usage.shape[0], dtype=torch.float32)
    keep[used_by_new & used_by_old] = shared
    keep[used_by_new & ~used_by_old] = new
    return keep


def blend(
    before: torch.Tensor, after: torch.Tensor, keep: torch.Tensor, rows_per_expert: int
) -> torch.Tensor:
    """``keep_e * before + (1 - keep_e) * after`` for stacked expert rows (``rows_per_expert`` each)."""
    weights = keep.to(after.dtype).repeat_interleave(rows_per_expert).unsqueeze(-1)
    return weights * before.to(after.dtype) + (1 - weights) * after


def snapshot_old_experts(model: ContinualMoEModel) -> Snapshot:
    """The stacked ``(A, B)`` of every layer's experts that existed before the newest task."""
    adapter_name = model.active_adapters[0]
    task = len(model.tasks) - 1
    saved: Snapshot = {}
    if task < 1:
        return saved
    for layer in model._layers():
        experts = layer.cmoe_experts[adapter_name]
        old_experts = experts.num_experts - model._config.new_experts_for(task, layer.layer_name)
        rows = old_experts * experts.r
        with zero3.gathered(experts.parameters()):  # one layer at a time: ZeRO-3 holds slices
            a, b = experts.stacked()
            saved[layer.layer_name] = (a.detach()[:rows].clone(), b.detach()[:rows].clone())
    return saved


def merge_newest_task(model: ContinualMoEModel, before: Snapshot) -> dict[str, Any]:
    """Blend the newest task's experts with `before` (call after `record_usage`); returns counts."""
    config = model._config
    adapter_name = model.active_adapters[0]
    task = len(model.tasks) - 1
    roles = {"shared": 0, "new_only": 0, "unused": 0}
    for layer in model._layers():
        if layer.layer_name not in before:
            continue
        routers, experts = layer.cmoe_routers[adapter_name], layer.cmoe_experts[adapter_name]
        old_a, old_b = before[layer.layer_name]
        count = old_a.shape[0] // experts.r
        # roles are decided among the task's candidate experts, then mapped to the layer's experts
        candidates = torch.tensor(routers.candidates(task), dtype=torch.long)
        old_usage = routers.usage_by_expert(experts.num_experts, tasks=range(task))[candidates]
        keep = torch.ones(experts.num_experts)
        keep[candidates] = momentum_coefficients(
            routers.usage[task].detach().float().cpu(),
            old_usage,
            config.momentum_shared,
            config.momentum_new,
            config.momentum_usage_threshold,
        )
        keep = keep[:count]
        roles["shared"] += int((keep == config.momentum_shared).sum())
        roles["new_only"] += int((keep == config.momentum_new).sum())
        roles["unused"] += int((keep == 1).sum())
        with zero3.gathered(experts.parameters(), modify=True):  # rewritten identically on every rank
            a, b = experts.stacked()
            experts.assign_stacked(
                blend(old_a, a.detach()[: old_a.shape[0]], keep, experts.r),
                blend(old_b, b.detach()[: old_b.shape[0]], keep, experts.r),
            )
    return roles
