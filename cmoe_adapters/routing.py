"""Routers: one per task in every adapted layer, top-k or dense gating, the load-balancing loss.

A task's router sees the experts that existed when the task was added (its own new ones included)
and never the experts of later tasks, so a later task cannot change an earlier task's routing. The
routing of one forward pass (which task each sample belongs to, which tokens are padding) is kept in
one `RoutingState` shared by all layers, so it is set once per forward, not once per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RoutingState:
    """What every adapted layer needs to know about the current forward pass.

    ``task`` is either one task index for the whole batch, or a 1-D tensor with one index per
    sample (different samples may belong to different tasks). It stays set after the forward so
    that gradient-checkpointing recomputation and generation decode steps route the same way.

    ``feature_hook``, when set, is called once per forward pass by the first adapted layer that
    runs, with that layer's input: the task locator's feature is taken there, and the hook may set
    ``task`` before any layer routes. ``bypass`` makes every adapted layer act as its base layer.
    """

    task: int | torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    collect_aux_loss: bool = True
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    feature_hook: Callable[[torch.Tensor], None] | None = None
    bypass: bool = False

    def reset(
        self,
        task: int | torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        feature_hook: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.task = task
        self.token_mask = token_mask
        self.feature_hook = feature_hook
        self.aux_losses.clear()


class TaskRouters(nn.Module):
    """The routers of one adapted layer, one linear map (no bias) per task, in task order.

    Router ``t`` has shape ``[E_t, d_in]`` where ``E_t`` is the number of experts it can choose from.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.ParameterList()

    def __len__(self) -> int:
        return len(self.weight)

    def num_experts(self, task: int) -> int:
        return self.weight[task].shape[0]

    def add(self, num_experts: int, init_std: float, *, device=None, dtype=None) -> None:
        """Append the router of a new task over `num_experts` experts."""
        weight = torch.empty(num_experts, self.in_features, device=device, dtype=dtype)
        nn.init.normal_(weight, std=init_std)
        self.weight.append(nn.Parameter(weight))

    def padded(self, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the routers of `tasks` (distinct indices) padded to the largest expert count.

        Returns ``(weights [U, E_max, d_in], visible [U, E_max] bool)``. Only the tasks present in a
        batch are gathered, so the cost does not grow with the number of registered tasks.
        """
        routers = [self.weight[t] for t in tasks.tolist()]
        width = max(r.shape[0] for r in routers)
        weights = torch.stack([nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in routers])
        counts = torch.tensor([r.shape[0] for r in routers], device=weights.device)
        visible = torch.arange(width, device=weights.device)[None, :] < counts[:, None]
        return weights, visible


def gates_from_logits(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Mixture weights per token, zeros outside the chosen experts.

    ``top_k >= 2``: softmax over the top-k logits (Mixtral). ``top_k == 1``: the chosen expert's
    probability under the softmax over *all* experts (Switch) -- renormalising a single expert would
    make its gate exactly 1 and leave the router without gradient. ``top_k=None`` (or
    ``top_k >= E``): the dense softmax. A layer with a single expert always gets weight exactly 1.
    """
    num_experts = logits.shape[-1]
    if top_k is None or top_k >= num_experts:
        return logits.softmax(dim=-1)
    if top_k == 1:
        probs = logits.softmax(dim=-1)
        value, index = probs.max(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, index, value)
    top_values, top_indices = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top_indices, top_values.softmax(dim=-1))


def load_balancing_loss(
    logits: torch.Tensor, top_k: int | None, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss ``E * sum_e f_e * P_e`` for one layer (1.0 when balanced).

    ``f_e`` is the fraction of (token, slot) assignments that go to expert ``e`` under top-k (top-1
    when routing is dense), ``P_e`` the mean router probability of ``e``. Padding tokens
    (``token_mask == False``) are left out.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    num_experts = logits.shape[-1]
    k = 1 if top_k is None else min(top_k, num_experts)
    probs = logits.softmax(dim=-1)
    assigned = torch.zeros_like(probs).scatter(-1, logits.topk(k, dim=-1).indices, 1.0)
    if token_mask is not None:
        weights = token_mask.reshape(-1, 1).to(probs.dtype)
        total = weights.sum().clamp_min(1.0)
        fraction = (assigned * weights).sum(0) / (total * k)
        mean_prob = (probs * weights).sum(0) / total
    else:
        fraction = assigned.mean(0) / k
        mean_prob = probs.mean(0)
    return num_experts * (fraction * mean_prob).sum()
