"""The mixture of LoRA experts inside one linear layer.

All experts of a layer are *stacked*: ``A`` is ``[E*r, d_in]`` and ``B`` is ``[E*r, d_out]``, so
the mixture ``sum_e g_e(x) B_e A_e x`` is two matrix products with the gates multiplied in
between -- never a Python loop over experts or tokens. The task's router is fused into the first
product (one matmul gives both the expert activations and the router logits).

Experts grow in *blocks*: every task that adds experts appends one block, so old experts can stay
frozen (``requires_grad=False``) while the new block trains. When a task is added, the blocks of
all earlier tasks are consolidated into one, so a layer holds at most two blocks (the frozen past
and the newest task's) and the concatenation per forward stays one cheap copy.

A task only ever sees the experts that existed when it was added (the first ``E_t`` rows), and the
product is computed on exactly that slice; later experts therefore cannot change an earlier task's
output, not even in its last bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import zero3
from .config import ContinualMoEConfig
from .routing import (
    BASE_MODEL,
    AuxLossGradient,
    Routed,
    RoutingState,
    TaskRouters,
    balancing_loss,
    candidate_experts,
    route,
)
from .sparse import prefer_sparse, sparse_lora
from .zero3 import full_shape

_SELECT_CACHE_SIZE = 8  # tasks whose selected experts inference keeps at hand, per layer


class LoRAExperts(nn.Module):
    """The stacked LoRA experts of one layer (for one adapter), grown block by block.

    ``lora_A[i]`` is ``[n_i * r, d_in]`` and ``lora_B[i]`` is ``[n_i * r, d_out]`` (B is stored
    transposed with respect to peft's ``lora_B.weight`` so that slicing the first experts gives a
    contiguous tensor). ``block_owner[i]`` is the index of the task that created block ``i``.
    """

    def __init__(self, in_features: int, out_features: int, r: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.block_owner: list[int] = []
        self._stacked_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._select_cache: dict[tuple[int, ...], tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def num_experts(self) -> int:
        return sum(full_shape(a)[0] for a in self.lora_A) // self.r

    def grow(
        self,
        count: int,
        owner: int,
        *,
        init_from: list[int] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Append `count` new experts created by task `owner`.

        New experts start like LoRA (A Kaiming-uniform, B zero, so the layer's output is unchanged)
        unless `init_from` names, for each new expert, an existing expert to copy. `generator` (a
        CPU one) draws the initial A, which is then moved to `device`.
        """
        if count <= 0:
            return
        r = self.r
        b = torch.zeros(count * r, self.out_features, device=device, dtype=dtype)
        if init_from is None:
            a = torch.empty(count * r, self.in_features, dtype=dtype)
            for i in range(count):  # init per expert, as LoRA does per adapter (a loop at creation only)
                nn.init.kaiming_uniform_(a[i * r : (i + 1) * r], a=math.sqrt(5), generator=generator)
            a = a.to(device)
        else:
            if len(init_from) != count:
                raise ValueError(f"init_from names {len(init_from)} experts for {count} new ones.")
            old_a, old_b = self.stacked()
            a = torch.empty(count * r, self.in_features, device=device, dtype=dtype)
            index = torch.tensor(init_from, device=old_a.device)
            rows = (index[:, None] * r + torch.arange(r, device=old_a.device)).flatten()
            a.copy_(old_a.detach()[rows])
            b.copy_(old_b.detach()[rows])
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(b))
        self.block_owner.append(owner)

    def consolidate(self) -> None:
        """Merge all blocks into one (done when a new task arrives; the merged block is frozen)."""
        if len(self.lora_A) <= 1:
            return
        a, b = (torch.cat([p.detach() for p in blocks]) for blocks in (self.lora_A, self.lora_B))
        self.lora_A = nn.ParameterList([nn.Parameter(a, requires_grad=False)])
        self.lora_B = nn.ParameterList([nn.Parameter(b, requires_grad=False)])
        self.block_owner = [self.block_owner[-1]]
        self._stacked_cache = None
        self._select_cache.clear()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [E*r, d_in], B [E*r, d_out])`` over all experts; cached while no block can change."""
        if len(self.lora_A) == 1:
            return self.lora_A[0], self.lora_B[0]
        blocks = (*self.lora_A, *self.lora_B)
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in blocks)
        if needs_graph or self.training:
            self._stacked_cache = None
            return torch.cat(list(self.lora_A)), torch.cat(list(self.lora_B))
        key = tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in blocks)
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            with torch.no_grad():
                self._stacked_cache = (key, (torch.cat(list(self.lora_A)), torch.cat(list(self.lora_B))))
        return self._stacked_cache[1]

    def select(self, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [C*r, d_in], B [C*r, d_out])`` of the experts `experts` (ascending), in that order.

        Built block by block: a block taken whole is used as it is (a trainable block keeps its
        gradient, and nothing else gets one), other rows are gathered. A task's candidates never
        change, so neither do these values when later tasks add experts. A gathered copy is cached
        while nothing in it can change (inference).
        """
        blocks = list(zip(self.lora_A, self.lora_B, strict=True))
        needs_graph = torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in blocks)
        versions = ((id(a), a._version, id(b), b._version, a.device, a.dtype) for a, b in blocks)
        key = (tuple(experts), *versions)
        cached = None if needs_graph or self.training else self._select_cache.get(tuple(experts))
        if cached is not None and cached[0] == key:
            return cached[1]
        pieces_a, pieces_b, start, r, gathered = [], [], 0, self.r, False
        for a, b in blocks:
            count = full_shape(a)[0] // r
            inside = [e - start for e in experts if start <= e < start + count]
            if inside == list(range(count)):
                pieces_a.append(a)
                pieces_b.append(b)
            elif inside:
                if inside == list(range(inside[0], inside[-1] + 1)):
                    rows = slice(inside[0] * r, (inside[-1] + 1) * r)
                    pieces_a.append(a[rows])
                    pieces_b.append(b[rows])
                else:
                    index = torch.tensor(inside, device=a.device)
                    rows = (index[:, None] * r + torch.arange(r, device=a.device)).flatten()
                    pieces_a.append(a.index_select(0, rows))
                    pieces_b.append(b.index_select(0, rows))
                    gathered = True
            start += count
        if len(pieces_a) == 1 and not gathered:
            return pieces_a[0], pieces_b[0]  # a block or a slice of one: nothing to keep
        selected = (
            (pieces_a[0], pieces_b[0]) if len(pieces_a) == 1 else (torch.cat(pieces_a), torch.cat(pieces_b))
        )
        # only copies are kept (never views of weights ZeRO-3 may release after the forward)
        if not (needs_graph or self.training or zero3.is_partitioned(blocks[0][0])):
            if len(self._select_cache) >= _SELECT_CACHE_SIZE:
                self._select_cache.pop(next(iter(self._select_cache)))
            self._select_cache[tuple(experts)] = (key, tuple(t.detach() for t in selected))
        return selected

    def set_trainable(self, owner: int | None, freeze_old: bool = True) -> None:
        """Train the blocks created by task `owner` (all blocks if not `freeze_old`); None: none."""
        for a, b, block_owner in zip(self.lora_A, self.lora_B, self.block_owner, strict=True):
            trainable = owner is not None and (block_owner == owner or not freeze_old)
            a.requires_grad_(trainable)
            b.requires_grad_(trainable)

    def remove_block_of(self, owner: int) -> None:
        """Drop the newest block if task `owner` created it (rolls back a probe)."""
        if self.block_owner and self.block_owner[-1] == owner:
            self.lora_A = nn.ParameterList(list(self.lora_A)[:-1])
            self.lora_B = nn.ParameterList(list(self.lora_B)[:-1])
            self.block_owner.pop()
            self._stacked_cache = None
            self._select_cache.clear()

    def assign_stacked(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Overwrite the first ``a.shape[0] // r`` experts with stacked values (in place)."""
        offset = 0
        with torch.no_grad():
            for block_a, block_b in zip(self.lora_A, self.lora_B, strict=True):
                take = max(0, min(block_a.shape[0], a.shape[0] - offset))
                block_a[:take].copy_(a[offset : offset + take])
                block_b[:take].copy_(b[offset : offset + take])
                offset += block_a.shape[0]


class ContinualMoELayer(nn.Module, BaseTunerLayer):
    """A frozen `nn.Linear` plus, per adapter, stacked LoRA experts and one router per task."""

    adapter_layer_names = ("cmoe_experts", "cmoe_routers")
    other_param_names = ()

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        config: ContinualMoEConfig,
        routing: RoutingState,
        layer_name: str,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.layer_name = layer_name
        self.routing = routing
        self.cmoe_experts = nn.ModuleDict()
        self.cmoe_routers = nn.ModuleDict()
        self.cmoe_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.top_k: dict[str, int | None] = {}
        self.router_init_std: dict[str, float] = {}
        self.expert_compute: dict[str, str] = {}
        self.freeze_old_experts: dict[str, bool] = {}
        self.dual_router_beta: dict[str, float | None] = {}
        self.usage_counts: dict[str, torch.Tensor] = {}
        self._pending_aux_loss: torch.Tensor | None = None  # see `_collect_aux_loss`
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self.train(base_layer.training)  # new modules start in training mode; follow the base model

    # -- structure --------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config: ContinualMoEConfig) -> None:
        """Create the adapter's (empty) experts and routers, then replay the tasks of its config."""
        self.cmoe_experts[adapter_name] = LoRAExperts(self.in_features, self.out_features, config.r)
        self.cmoe_routers[adapter_name] = TaskRouters(
            self.in_features,
            shared=not config.router_per_task,
            learned_gate=config.dual_router and config.task_gate == "learned",
        )
        self.cmoe_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        ).train(self.training)
        self.cmoe_experts[adapter_name].train(self.training)
        self.scaling[adapter_name] = config.lora_alpha / config.r
        self.top_k[adapter_name] = config.top_k
        self.router_init_std[adapter_name] = config.router_init_std
        self.expert_compute[adapter_name] = config.expert_compute
        self.freeze_old_experts[adapter_name] = config.freeze_old_experts
        self.dual_router_beta[adapter_name] = config.dual_router_beta if config.dual_router else None
        for task_index in range(len(config.task_records)):  # candidates are then read from the weights
            self.add_task(
                adapter_name,
                config.new_experts_for(task_index, self.layer_name),
                max_experts=config.router_experts_for(task_index),
            )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _adapter_device_dtype(self, adapter_name: str) -> tuple[torch.device, torch.dtype]:
        """New adapter weights follow the existing ones; else fp32 (or the base dtype if wider)."""
        existing = next(self.cmoe_experts[adapter_name].parameters(), None)
        if existing is None:
            existing = next(self.cmoe_routers[adapter_name].parameters(), None)
        weight = self.get_base_layer().weight
        if existing is not None:
            return weight.device, existing.dtype
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        return weight.device, dtype

    def add_task(
        self,
        adapter_name: str,
        new_experts: int,
        init_from: list[int] | None = None,
        *,
        max_experts: int | None = None,
        preferred: list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Freeze the past, add `new_experts` experts and the new task's router.

        The router chooses among the new experts and, up to `max_experts` in all, the old ones
        `preferred` names first, then those earlier tasks used most (see `candidate_experts`).
        `generator` draws their initial weights (see `ContinualMoEConfig.init_seed`).
        """
        experts = self.cmoe_experts[adapter_name]
        routers = self.cmoe_routers[adapter_name]
        device, dtype = self._adapter_device_dtype(adapter_name)
        old = experts.num_experts
        experts.consolidate()
        experts.grow(
            new_experts,
            owner=len(routers),
            init_from=init_from,
            device=device,
            dtype=dtype,
            generator=generator,
        )
        old_usage = routers.usage_by_expert(old) if max_experts is not None and len(routers) else None
        if routers.shared and len(routers):
            candidates = routers.candidates(0)
        else:
            candidates = candidate_experts(old, new_experts, max_experts, preferred, old_usage)
        routers.add(
            candidates, self.router_init_std[adapter_name], device=device, dtype=dtype, generator=generator
        )

    def remove_last_task(self, adapter_name: str) -> None:
        """Undo the newest `add_task` (its router, statistics and new experts)."""
        routers = self.cmoe_routers[adapter_name]
        self.cmoe_experts[adapter_name].remove_block_of(len(routers) - 1)
        routers.remove_last()

    def set_trainable_task(self, adapter_name: str, task: int | None) -> None:
        """Only task `task`'s router and experts get gradients (``None``: nothing).

        Its experts are the ones it created, or every expert when old experts are not frozen.
        """
        self.cmoe_experts[adapter_name].set_trainable(task, self.freeze_old_experts[adapter_name])
        routers = self.cmoe_routers[adapter_name]
        for parameter in routers.parameters():
            parameter.requires_grad_(False)
        if task is not None:
            routers.router(task).requires_grad_(True)
            if routers.learned_gate:
                routers.task_logits[task].requires_grad_(True)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """peft's `set_adapter`, then the continual rule: only the newest task is trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(
                f"Only one continual-MoE adapter can be active at a time, got {names}: its tasks already "
                "give you one mixture per task."
            )
        super().set_adapter(names, inference_mode=inference_mode)
        for name in names:
            if name in self.cmoe_routers:
                newest = len(self.cmoe_routers[name]) - 1
                self.set_trainable_task(name, None if inference_mode or newest < 0 else newest)

    # -- forward ----------------------------------------------------------------------------------

    def _feature_only_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A pass that only wants the locator's feature: the first adapted layer's input.

        Every adapted layer then outputs zeros instead of computing anything, since the caller
        discards the pass's output; a base weight partitioned by DeepSpeed ZeRO-3 still runs, as
        ZeRO-3 expects each layer's parameters to be fetched and released in turn.
        """
        if self.routing.feature_hook is not None:
            hook, self.routing.feature_hook = self.routing.feature_hook, None
            hook(x)
        base = self.get_base_layer()
        if zero3.is_partitioned(base.weight):
            return self.base_layer(x, *args, **kwargs)
        return x.new_zeros(*x.shape[:-1], base.out_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing.feature_only and not self.routing.bypass:  # bypass: the paper's base pass
            return self._feature_only_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged or self.routing.bypass:
            return result
        if self.routing.feature_hook is not None:  # the first adapted layer to run: locator feature
            hook, self.routing.feature_hook = self.routing.feature_hook, None
            hook(x)
        adapter_name = self.active_adapters[0]
        if adapter_name not in self.cmoe_routers or len(self.cmoe_routers[adapter_name]) == 0:
            return result
        task = self.routing.task
        if self.routing.any_base and not isinstance(task, torch.Tensor):
            return result  # no sample of a learnt task: the base model answers
        if task is None:
            if len(self.cmoe_routers[adapter_name]) > 1:
                raise RuntimeError(
                    "No task is set for this forward pass and several tasks are registered: pass task=... "
                    "to the model's forward or generate."
                )
            task = 0
        output = (result + self._mixture(x, adapter_name, task)).to(result.dtype)
        if self._pending_aux_loss is not None:
            output = self._attach_pending_aux_loss(output)
        return output

    def _mixture(self, x: torch.Tensor, adapter_name: str, task: int | torch.Tensor) -> torch.Tensor:
        if isinstance(task, torch.Tensor):
            return self._mixed_task_mixture(x, adapter_name)
        experts = self.cmoe_experts[adapter_name]
        routers = self.cmoe_routers[adapter_name]
        dropout = self.cmoe_dropout[adapter_name]
        candidates = routers.candidates(task)  # never empty: every task reaches >= num_experts >= 1
        num_experts, r = len(candidates), experts.r
        expert_a, expert_b = experts.select(candidates)
        router = routers.router(task)
        x = self._cast_input_dtype(x, expert_a.dtype)
        top_k, beta = self.top_k[adapter_name], self.dual_router_beta[adapter_name]
        # decided by what this task sees only, so later tasks never change how it is computed
        sparse = beta is None and self._sparse(adapter_name, num_experts, top_k, x)
        hidden = None
        if sparse:
            logits = F.linear(x, router)
        elif isinstance(dropout, nn.Identity):
            fused = F.linear(x, torch.cat([expert_a, router]))
            hidden, logits = fused.split([num_experts * r, num_experts], dim=-1)
        else:
            hidden, logits = F.linear(dropout(x), expert_a), F.linear(x, router)
        routed = route(logits, top_k)
        self._observe(adapter_name, routed, count_usage=True)
        scaling = self.scaling[adapter_name]
        if sparse:
            shape = (num_experts, r, -1)
            weights = routed.weights * scaling
            return sparse_lora(dropout(x), expert_a.view(shape), expert_b.view(shape), routed.chosen, weights)
        gates = routed.gates
        task_gate = routers.task_gate(task) if beta is not None else None
        if task_gate is not None:  # CL-MoE's dual router: beta * G^I(x) + (1 - beta) * G^T(t)
            gates = beta * gates + (1 - beta) * task_gate.to(gates.dtype)
        # the LoRA scaling rides on the [tokens, E] gates rather than on the [tokens, d_out] output
        gates = (gates * scaling).to(hidden.dtype)
        hidden = rearrange(hidden, "... (e r) -> ... e r", r=r) * gates.unsqueeze(-1)
        return rearrange(hidden, "... e r -> ... (e r)") @ expert_b

    def _sparse(self, adapter_name: str, num_experts: int, top_k: int | None, x: torch.Tensor) -> bool:
        """Whether a task routing to `top_k` of `num_experts` experts runs on the sparse path."""
        if top_k is None or top_k >= num_experts:
            return False
        compute = self.expert_compute[adapter_name]
        if compute == "auto":
            return prefer_sparse(num_experts, top_k, x.device, x.dtype)
        return compute == "sparse"

    def _mixed_task_mixture(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Samples of different tasks in one batch: each token routes with its sample's router.

        The routers are gathered per sample from a padded table (on the device, no host reads),
        and the chosen experts run sparsely over all of the layer's experts.
        """
        if x.dim() != 3:
            raise RuntimeError(
                f"Per-sample routing needs [batch, tokens, features] inputs; {self.layer_name} got "
                f"{tuple(x.shape)}."
            )
        experts = self.cmoe_experts[adapter_name]
        routers = self.cmoe_routers[adapter_name]
        tasks = self.routing.tasks_for(x.shape[0]).to(x.device)
        known = None
        if self.routing.any_base:
            known, tasks = tasks != BASE_MODEL, tasks.clamp_min(0)
        # kept between forwards only where no gradient flows (inference, generate, evaluation)
        table = routers.table(cacheable=not torch.is_grad_enabled())
        all_a, all_b = experts.stacked()
        x = self._cast_input_dtype(x, all_a.dtype)
        logits = torch.einsum("bnd,bcd->bnc", x, table["weight"][tasks].to(x.dtype))
        logits = logits.masked_fill(~table["visible"][tasks][:, None, :], float("-inf"))
        routed = route(logits, self.top_k[adapter_name])
        self._observe(adapter_name, routed, count_usage=False)
        beta = self.dual_router_beta[adapter_name]
        slots = table["experts"][tasks][:, None, :].expand(*logits.shape)  # [batch, tokens, C_max]
        if routed.chosen is not None and beta is None:
            chosen, weights = torch.gather(slots, -1, routed.chosen), routed.weights
        else:  # dense gates (dense routing, or the dual router's dense task gate)
            chosen, weights = slots, routed.gates
            if beta is not None and "gate" in table:
                mix = torch.where(table["has_gate"][tasks], beta, 1.0)[:, None, None].to(weights.dtype)
                weights = mix * weights + (1 - mix) * table["gate"][tasks][:, None, :].to(weights.dtype)
        r = experts.r
        mixture = sparse_lora(
            self.cmoe_dropout[adapter_name](x),
            all_a.view(-1, r, all_a.shape[-1]),
            all_b.view(-1, r, all_b.shape[-1]),
            chosen,
            weights * self.scaling[adapter_name],
        )
        if known is not None:  # samples of no learnt task: exactly the base layer's output
            mixture = torch.where(known[:, None, None], mixture, torch.zeros((), dtype=mixture.dtype))
        return mixture

    def _observe(self, adapter_name: str, routed: Routed, count_usage: bool) -> None:
        """The balancing loss (training) and expert usage (when tracked) of one routing decision."""
        mask = self.routing.token_mask
        if mask is not None and tuple(mask.shape) != tuple(routed.probs.shape[:-1]):
            mask = None
        if self.training and self.routing.collect_aux_loss:
            self._collect_aux_loss(routed, mask)
        if self.routing.track_usage and count_usage:
            self._count_usage(adapter_name, routed.assigned, mask)

    def _collect_aux_loss(self, routed: Routed, mask: torch.Tensor | None) -> None:
        """This layer's balancing loss, counted once per forward whatever activation checkpointing does.

        With autograd on, the first pass stores it (the caller adds `router_aux_loss()` to its loss)
        and a non-reentrant recompute finds it stored. A reentrant checkpoint's first pass has no
        autograd: it leaves a placeholder, and its recompute (inside backward) attaches the loss's
        gradient to this layer's output instead (`AuxLossGradient`).
        """
        losses, name = self.routing.aux_losses, self.layer_name
        if not torch.is_grad_enabled():
            if name not in losses:  # its value is logged all the same
                losses[name] = None
                self.routing.aux_loss_values[name] = balancing_loss(routed, mask)
            return
        loss = balancing_loss(routed, mask)  # also in a recompute: it must repeat the first pass's ops
        if name not in losses:
            losses[name] = loss
            self.routing.aux_loss_values[name] = loss.detach()
        elif losses[name] is None:
            self._pending_aux_loss = loss

    def _attach_pending_aux_loss(self, output: torch.Tensor) -> torch.Tensor:
        aux, self._pending_aux_loss = self._pending_aux_loss, None
        routing = self.routing
        weight = routing.aux_loss_coef * routing.aux_gradient_scale / max(1, len(routing.aux_losses))
        return AuxLossGradient.apply(output, aux, weight)

    def _count_usage(self, adapter_name: str, assigned: torch.Tensor, mask) -> None:
        if mask is not None:
            assigned = assigned * mask.unsqueeze(-1).to(assigned.dtype)
        counts = assigned.reshape(-1, assigned.shape[-1]).sum(0).double()
        previous = self.usage_counts.get(adapter_name)
        if previous is not None and previous.shape == counts.shape:
            counts = counts + previous
        self.usage_counts[adapter_name] = counts

    # -- peft API ---------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "A mixture of experts routes every token differently, so it cannot be merged into the base "
            "weights. Use unload() to get the base model back."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("Continual-MoE layers are never merged.")

    def __repr__(self) -> str:
        return "cmoe." + super().__repr__()
