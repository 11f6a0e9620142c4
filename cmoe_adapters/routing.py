"""Routers: one per task in every adapted layer, top-k or dense gating, the load-balancing loss.

A task's router sees the experts that existed when the task was added (its own new ones included)
and never the experts of later tasks, so a later task cannot change an earlier task's routing. The
routing of one forward pass (which task each sample belongs to, which tokens are padding) is kept in
one `RoutingState` shared by all layers, so it is set once per forward, not once per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .zero3 import full_shape


class AuxLossGradient(torch.autograd.Function):
    """Identity on a layer's output whose backward also sends ``weight`` into a balancing loss.

    Under reentrant activation checkpointing a layer's first forward runs without autograd, so its
    balancing loss cannot join the task loss; the checkpoint's recompute, inside backward, then
    attaches it here, and the loss's gradient flows exactly once, as if it had been added.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.aux_meta = (aux.dtype, aux.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad, torch.full((), ctx.weight, dtype=dtype, device=device), None


BASE_MODEL = -1  # the task index of a sample the base model answers (adapters off): no learnt task


@dataclass
class RoutingState:
    """What every adapted layer needs to know about the current forward pass.

    ``task`` is either one task index for the whole batch, or a 1-D tensor with one index per
    sample (different samples may belong to different tasks); `BASE_MODEL` marks samples of no
    learnt task, which get the base layer's output unchanged (``any_base`` says whether there are).
    It stays set after the forward so that gradient-checkpointing recomputation and generation
    decode steps route the same way.

    ``feature_hook``, when set, is called once per forward pass by the first adapted layer that
    runs, with that layer's input: the task locator's feature is taken there, and the hook may set
    ``task`` before any layer routes. ``bypass`` makes every adapted layer act as its base layer.
    ``feature_only`` marks a pass that only wants that feature (``locate_tasks``): after the hook,
    the adapted layers skip their work and output zeros, since the pass's output is discarded.
    With ``track_usage``, each layer counts the top-k expert assignments of its tokens.
    """

    task: int | torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    collect_aux_loss: bool = True
    # each layer's balancing loss of this forward, once (a recompute never adds it again); None
    # while it waits for the recompute of a reentrant activation checkpoint (see `AuxLossGradient`)
    aux_losses: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # the same losses' values (detached), also of layers whose loss waits for the recompute: logging
    aux_loss_values: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_loss_coef: float = 0.0
    aux_gradient_scale: float = 1.0  # what the caller's loss is divided by (gradient accumulation)
    feature_hook: Callable[[torch.Tensor], None] | None = None
    bypass: bool = False
    feature_only: bool = False
    track_usage: bool = False

    any_base: bool = False

    _per_sample: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def reset(
        self,
        task: int | torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        feature_hook: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.set_task(task)
        self.token_mask = token_mask
        self.feature_hook = feature_hook
        self.aux_losses.clear()
        self.aux_loss_values.clear()

    def set_task(self, task: int | torch.Tensor | None) -> None:
        """Route with `task`; per-sample tasks that are all the same become one index.

        That check reads two numbers from the device once per forward pass (or once per generate
        call), so that the layers never have to.
        """
        self._per_sample = {}
        if isinstance(task, torch.Tensor):
            low, high = torch.stack(torch.aminmax(task.reshape(-1))).tolist()
            task = int(low) if low == high else task
            self.any_base = low == BASE_MODEL
        else:
            self.any_base = task == BASE_MODEL
        self.task = task

    def tasks_for(self, batch: int) -> torch.Tensor:
        """The per-sample tasks for an input of `batch` rows (repeated for beams / return sequences)."""
        aligned = self._per_sample.get(batch)
        if aligned is None:
            tasks = self.task
            if batch % tasks.numel():
                raise RuntimeError(
                    f"Cannot align {tasks.numel()} per-sample tasks with a batch of {batch} inputs."
                )
            aligned = tasks if batch == tasks.numel() else tasks.repeat_interleave(batch // tasks.numel())
            self._per_sample[batch] = aligned
        return aligned


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


def _after_load(module: TaskRouters, incompatible_keys: object) -> None:
    module.invalidate()


class TaskRouters(nn.Module):
    """The routers of one adapted layer, one linear map (no bias) per task, in task order.

    Router ``t`` has shape ``[C_t, d_in]``: it chooses among ``C_t`` *candidate* experts, whose
    layer-wide indices are ``expert_index[t]`` (ascending). A task's candidates are fixed when it is
    added -- its own new experts plus, up to a cap, the old experts most useful to it -- so what a
    task adds does not grow with the number of tasks before it (with ``shared=True`` every task uses
    router 0). Each task also keeps its expert-usage share ``usage[t]`` (``[C_t]``, top-k
    assignments counted over its training) and, with ``learned_gate=True``, the logits of a learned
    task-level gate (CL-MoE's dual router).
    """

    def __init__(self, in_features: int, shared: bool = False, learned_gate: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.shared = shared
        self.learned_gate = learned_gate
        self.weight = nn.ParameterList()
        self.task_logits = nn.ParameterList()
        self.usage = BufferList()
        self.expert_index = BufferList()
        self._candidates: dict[int, tuple[int, list[int]]] = {}  # task -> (buffer version, indices)
        self._has_gate: dict[int, tuple[int, bool]] = {}  # task -> (usage version, any usage)
        self._table: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self._generation = 0  # bumped whenever a router, a candidate set or a task gate may change
        self.register_load_state_dict_post_hook(_after_load)  # a function, not a lambda: pickles

    def __len__(self) -> int:
        return len(self.usage)

    def invalidate(self) -> None:
        """Forget what was derived from the routers (after loading or rewriting them)."""
        self._candidates.clear()
        self._has_gate.clear()
        self._table = None
        self._generation += 1

    def router(self, task: int) -> nn.Parameter:
        return self.weight[0 if self.shared else task]

    def num_experts(self, task: int) -> int:
        """How many candidate experts task `task` routes among."""
        return full_shape(self.usage[task])[0]

    def candidates(self, task: int) -> list[int]:
        """Layer-wide indices of task `task`'s candidate experts (read from the device once)."""
        index = self.expert_index[task]
        cached = self._candidates.get(task)
        if cached is None or cached[0] != index._version:
            cached = (index._version, index.tolist())
            self._candidates[task] = cached
        return cached[1]

    def add(
        self,
        candidates: list[int],
        init_std: float,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Append the router (and statistics) of a new task over the experts `candidates`.

        `generator` (a CPU one) draws the router's initial weights, which are then moved to `device`.
        """
        num_experts = len(candidates)
        if not self.shared or len(self.weight) == 0:
            weight = torch.empty(num_experts, self.in_features, dtype=dtype)
            nn.init.normal_(weight, std=init_std, generator=generator)
            self.weight.append(nn.Parameter(weight.to(device)))
        self.usage.append(torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.expert_index.append(torch.tensor(candidates, device=device, dtype=torch.long))
        if self.learned_gate:
            self.task_logits.append(nn.Parameter(torch.zeros(num_experts, device=device, dtype=dtype)))
        self.invalidate()

    def remove_last(self) -> None:
        """Forget the newest task (used to roll back a probe)."""
        self.usage.pop()
        self.expert_index.pop()
        if self.learned_gate:
            self.task_logits = nn.ParameterList(list(self.task_logits)[:-1])
        if not self.shared or len(self) == 0:
            self.weight = nn.ParameterList(list(self.weight)[:-1])
        self.invalidate()

    def set_usage(self, task: int, share: torch.Tensor) -> None:
        """Store task `task`'s expert-usage share (CL-MoE's usage gate and candidate choice read it)."""
        usage = self.usage[task]
        usage.copy_(share.to(usage.device, usage.dtype))
        self.invalidate()

    def usage_by_expert(self, num_experts: int, tasks: Sequence[int] | None = None) -> torch.Tensor:
        """The usage shares of `tasks` (default all) summed per layer-wide expert (fp32, on the CPU)."""
        total = torch.zeros(num_experts)
        for task in range(len(self)) if tasks is None else tasks:
            index = torch.tensor(self.candidates(task), dtype=torch.long)
            total.index_add_(0, index, self.usage[task].detach().float().cpu())
        return total

    def task_gate(self, task: int) -> torch.Tensor | None:
        """CL-MoE's task-level gate ``G^T(t)`` over ``C_t`` experts (None before it exists)."""
        if self.learned_gate:
            return self.task_logits[task].softmax(-1)
        usage = self.usage[task]
        cached = self._has_gate.get(task)
        if cached is None or cached[0] != usage._version:  # one host read per change, not per forward
            cached = (usage._version, bool(usage.sum() > 0))
            self._has_gate[task] = cached
        return usage if cached[1] else None

    def table(self, cacheable: bool) -> dict[str, torch.Tensor]:
        """Every task's router, candidates and task gate, padded to the widest, for mixed batches.

        ``weight [T, C_max, d_in]``, ``experts [T, C_max]`` (layer-wide, padding points at expert
        0), ``visible [T, C_max]`` bool, and with a task-level gate ``gate [T, C_max]`` and
        ``has_gate [T]``. Per-sample routing then gathers rows of these by the samples' task
        indices, on the device, whatever the number of tasks. With `cacheable` (no gradient flows:
        inference, generate, evaluation) it is kept until a task is added or removed, the routers
        are loaded, or the newest task's router or statistics change.
        """
        newest = len(self) - 1  # the only task whose router an optimizer may have stepped since
        key = (
            self._generation,
            self.router(newest)._version,
            self.usage[newest]._version,
            self.task_logits[newest]._version if self.learned_gate else None,
        )
        if cacheable and self._table is not None and self._table[0] == key:
            return self._table[1]
        tasks = range(len(self))
        routers = [self.router(t) for t in tasks]
        counts = [r.shape[0] for r in routers]
        width = max(counts)
        device = routers[0].device
        pad = nn.functional.pad
        table = {
            "weight": torch.stack([pad(r, (0, 0, 0, width - r.shape[0])) for r in routers]),
            "experts": torch.stack([pad(e, (0, width - e.shape[0])) for e in self.expert_index]).to(device),
        }
        visible = torch.tensor(counts, device=device)
        table["visible"] = torch.arange(width, device=device)[None, :] < visible[:, None]
        if self.learned_gate or any(u.numel() for u in self.usage):
            gates = [self.task_gate(t) for t in tasks]
            table["has_gate"] = torch.tensor([g is not None for g in gates], device=device)
            empty = torch.zeros(width, device=device)
            table["gate"] = torch.stack(
                [empty if g is None else pad(g.float(), (0, width - g.shape[0])) for g in gates]
            )
        if cacheable:
            self._table = (key, table)
        return table


def candidate_experts(
    old_experts: int,
    new_experts: int,
    cap: int | None,
    preferred: Sequence[int] | None = None,
    old_usage: torch.Tensor | None = None,
) -> list[int]:
    """The experts a new task's router chooses among: its own new ones, then old ones up to `cap`.

    Old experts are taken in the order of `preferred` (the probe phase's measurement of which old
    experts the new task uses), then by how much earlier tasks used them (`old_usage`), then
    newest first. Without a cap the task sees every expert. Returned ascending.
    """
    own = list(range(old_experts, old_experts + new_experts))
    room = old_experts if cap is None else max(0, min(old_experts, cap - new_experts))
    if room >= old_experts:
        return list(range(old_experts)) + own
    ranked = [e for e in dict.fromkeys(preferred or []) if 0 <= e < old_experts]
    if len(ranked) < room:
        score = old_usage if old_usage is not None else torch.zeros(old_experts)
        rest = sorted(set(range(old_experts)) - set(ranked), key=lambda e: (-float(score[e]), -e))
        ranked += rest
    return sorted(ranked[:room]) + own


@dataclass
class Routed:
    """One router decision for every token: probabilities, mixture weights and chosen experts.

    Computed once per layer and shared by the mixture, the balancing loss and the usage counts,
    so the router's softmax and top-k run once (on tiny models these small ops are a visible
    share of a step). ``chosen``/``weights`` are the sparse form of ``gates`` (None when dense).
    """

    probs: torch.Tensor  # softmax over all of the task's experts, fp32, [..., E]
    gates: torch.Tensor  # mixture weights, zeros outside the chosen experts, [..., E]
    assigned: torch.Tensor  # one-hot of the chosen experts (top-1 when dense), fp32, [..., E]
    k: int  # experts chosen per token in `assigned`
    chosen: torch.Tensor | None = None  # the top-k experts of every token, [..., k]
    weights: torch.Tensor | None = None  # their mixture weights, [..., k]


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
        assigned = torch.zeros_like(probs).scatter(-1, chosen, 1.0)
        return Routed(probs, probs, assigned, 1)
    values, chosen = probs.topk(top_k, dim=-1)
    if top_k > 1:
        values = values / values.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, chosen, values)
    assigned = torch.zeros_like(probs).scatter(-1, chosen.detach(), 1.0)
    return Routed(probs, gates, assigned, top_k, chosen, values)


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
