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

from .zero3 import full_shape


@dataclass
class RoutingState:
    """What every adapted layer needs to know about the current forward pass.

    ``task`` is either one task index for the whole batch, or a 1-D tensor with one index per
    sample (different samples may belong to different tasks). It stays set after the forward so
    that gradient-checkpointing recomputation and generation decode steps route the same way.

    ``feature_hook``, when set, is called once per forward pass by the first adapted layer that
    runs, with that layer's input: the task locator's feature is taken there, and the hook may set
    ``task`` before any layer routes. ``bypass`` makes every adapted layer act as its base layer.
    With ``track_usage``, each layer counts the top-k expert assignments of its tokens.
    """

    task: int | torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    collect_aux_loss: bool = True
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    feature_hook: Callable[[torch.Tensor], None] | None = None
    bypass: bool = False
    track_usage: bool = False

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


class BufferList(nn.Module):
    """A list of tensors saved with the module (buffers named ``0, 1, ...``)."""

    def __len__(self) -> int:
        return len(self._buffers)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._buffers[str(index if index >= 0 else len(self) + index)]

    def __iter__(self):
        return iter(self._buffers.values())

    def append(self, tensor: torch.Tensor) -> None:
        self.register_buffer(str(len(self)), tensor)

    def pop(self) -> torch.Tensor:
        return self._buffers.pop(str(len(self) - 1))


class TaskRouters(nn.Module):
    """The routers of one adapted layer, one linear map (no bias) per task, in task order.

    Router ``t`` has shape ``[E_t, d_in]`` where ``E_t`` is the number of experts it can choose from
    (with ``shared=True`` every task uses router 0). Each task also keeps its expert-usage share
    ``usage[t]`` (``[E_t]``, top-k assignments counted over its training) and, with
    ``learned_gate=True``, the logits of a learned task-level gate (CL-MoE's dual router).
    """

    def __init__(self, in_features: int, shared: bool = False, learned_gate: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.shared = shared
        self.learned_gate = learned_gate
        self.weight = nn.ParameterList()
        self.task_logits = nn.ParameterList()
        self.usage = BufferList()

    def __len__(self) -> int:
        return len(self.usage)

    def router(self, task: int) -> nn.Parameter:
        return self.weight[0 if self.shared else task]

    def num_experts(self, task: int) -> int:
        return full_shape(self.router(task))[0]

    def add(self, num_experts: int, init_std: float, *, device=None, dtype=None) -> None:
        """Append the router (and statistics) of a new task over `num_experts` experts."""
        if not self.shared or len(self.weight) == 0:
            weight = torch.empty(num_experts, self.in_features, device=device, dtype=dtype)
            nn.init.normal_(weight, std=init_std)
            self.weight.append(nn.Parameter(weight))
        self.usage.append(torch.zeros(num_experts, device=device, dtype=torch.float32))
        if self.learned_gate:
            self.task_logits.append(nn.Parameter(torch.zeros(num_experts, device=device, dtype=dtype)))

    def remove_last(self) -> None:
        """Forget the newest task (used to roll back a probe)."""
        self.usage.pop()
        if self.learned_gate:
            self.task_logits = nn.ParameterList(list(self.task_logits)[:-1])
        if not self.shared or len(self) == 0:
            self.weight = nn.ParameterList(list(self.weight)[:-1])

    def task_gate(self, task: int) -> torch.Tensor | None:
        """CL-MoE's task-level gate ``G^T(t)`` over ``E_t`` experts (None before it exists)."""
        if self.learned_gate:
            return self.task_logits[task].softmax(-1)
        usage = self.usage[task]
        return usage if bool(usage.sum() > 0) else None

    def padded(self, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the routers of `tasks` (distinct indices) padded to the largest expert count.

        Returns ``(weights [U, E_max, d_in], visible [U, E_max] bool)``. Only the tasks present in a
        batch are gathered, so the cost does not grow with the number of registered tasks.
        """
        routers = [self.router(t) for t in tasks.tolist()]
        width = max(r.shape[0] for r in routers)
        weights = torch.stack([nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in routers])
        counts = torch.tensor([r.shape[0] for r in routers], device=weights.device)
        visible = torch.arange(width, device=weights.device)[None, :] < counts[:, None]
        return weights, visible

    def padded_task_gates(self, tasks: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gates [U, width], present [U] bool)`` of `tasks`' task-level gates, zero-padded."""
        gates, present = [], []
        for task in tasks.tolist():
            gate = self.task_gate(task)
            present.append(gate is not None)
            gate = torch.zeros(width, device=self.usage[task].device) if gate is None else gate.float()
            gates.append(nn.functional.pad(gate, (0, width - gate.shape[0])))
        return torch.stack(gates), torch.tensor(present, device=gates[0].device)


@dataclass
class Routed:
    """One router decision for every token: probabilities, mixture weights and chosen experts.

    Computed once per layer and shared by the mixture, the balancing loss and the usage counts,
    so the router's softmax and top-k run once (on tiny models these small ops are a visible
    share of a step).
    """

    probs: torch.Tensor  # softmax over all of the task's experts, fp32, [..., E]
    gates: torch.Tensor  # mixture weights, zeros outside the chosen experts, [..., E]
    assigned: torch.Tensor  # one-hot of the chosen experts (top-1 when dense), fp32, [..., E]
    k: int  # experts chosen per token in `assigned`


def route(logits: torch.Tensor, top_k: int | None) -> Routed:
    """Gates per token from router logits.

    ``top_k >= 2``: softmax over the top-k logits (Mixtral; equal to the renormalised top-k
    probabilities). ``top_k == 1``: the chosen expert's probability under the softmax over *all*
    experts (Switch) -- renormalising a single expert would make its gate exactly 1 and leave the
    router without gradient. ``top_k=None`` (or ``top_k >= E``): the dense softmax. A layer with a
    single expert always gets weight exactly 1.
    """
    probs = logits.float().softmax(dim=-1)
    num_experts = probs.shape[-1]
    if top_k is None or top_k >= num_experts:
        chosen = probs.argmax(dim=-1, keepdim=True)
        gates, k = probs, 1
    else:
        values, chosen = probs.topk(top_k, dim=-1)
        if top_k > 1:
            values = values / values.sum(dim=-1, keepdim=True)
        gates, k = torch.zeros_like(probs).scatter(-1, chosen, values), top_k
    assigned = torch.zeros_like(probs).scatter(-1, chosen.detach(), 1.0)
    return Routed(probs, gates, assigned, k)


def balancing_loss(routed: Routed, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss ``E * sum_e f_e * P_e`` for one layer (1.0 when balanced).

    ``f_e`` is the fraction of (token, slot) assignments that go to expert ``e`` under top-k (top-1
    when routing is dense), ``P_e`` the mean router probability of ``e``. Padding tokens
    (``token_mask == False``) are left out.
    """
    num_experts = routed.probs.shape[-1]
    probs = routed.probs.reshape(-1, num_experts)
    assigned = routed.assigned.reshape(-1, num_experts)
    if token_mask is not None:
        weights = token_mask.reshape(-1, 1).to(probs.dtype)
        total = weights.sum().clamp_min(1.0)
        fraction = (assigned * weights).sum(0) / (total * routed.k)
        mean_prob = (probs * weights).sum(0) / total
    else:
        fraction = assigned.mean(0) / routed.k
        mean_prob = probs.mean(0)
    return num_experts * (fraction * mean_prob).sum()


def gates_from_logits(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Mixture weights per token (see `route`)."""
    return route(logits, top_k).gates


def load_balancing_loss(
    logits: torch.Tensor, top_k: int | None, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The balancing loss of one layer's router logits (see `balancing_loss`)."""
    return balancing_loss(route(logits, top_k), token_mask)
