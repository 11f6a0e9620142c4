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

from .config import ContinualMoEConfig
from .routing import RoutingState, TaskRouters, balancing_loss, route
from .zero3 import full_shape


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
    ) -> None:
        """Append `count` new experts created by task `owner`.

        New experts start like LoRA (A Kaiming-uniform, B zero, so the layer's output is unchanged)
        unless `init_from` names, for each new expert, an existing expert to copy.
        """
        if count <= 0:
            return
        r = self.r
        a = torch.empty(count * r, self.in_features, device=device, dtype=dtype)
        b = torch.zeros(count * r, self.out_features, device=device, dtype=dtype)
        if init_from is None:
            for i in range(count):  # init per expert, as LoRA does per adapter (a loop at creation only)
                nn.init.kaiming_uniform_(a[i * r : (i + 1) * r], a=math.sqrt(5))
        else:
            if len(init_from) != count:
                raise ValueError(f"init_from names {len(init_from)} experts for {count} new ones.")
            old_a, old_b = self.stacked()
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
        self.freeze_old_experts: dict[str, bool] = {}
        self.dual_router_beta: dict[str, float | None] = {}
        self.usage_counts: dict[str, torch.Tensor] = {}
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
        self.freeze_old_experts[adapter_name] = config.freeze_old_experts
        self.dual_router_beta[adapter_name] = config.dual_router_beta if config.dual_router else None
        for task_index in range(len(config.task_records)):
            self.add_task(adapter_name, config.new_experts_for(task_index, self.layer_name))
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

    def add_task(self, adapter_name: str, new_experts: int, init_from: list[int] | None = None) -> None:
        """Freeze the past, add `new_experts` experts and a router over all experts for a new task."""
        experts = self.cmoe_experts[adapter_name]
        routers = self.cmoe_routers[adapter_name]
        device, dtype = self._adapter_device_dtype(adapter_name)
        experts.consolidate()
        experts.grow(new_experts, owner=len(routers), init_from=init_from, device=device, dtype=dtype)
        routers.add(experts.num_experts, self.router_init_std[adapter_name], device=device, dtype=dtype)

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

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged or self.routing.bypass:
            return result
        if self.routing.feature_hook is not None:  # the first adapted layer to run: locator feature
            hook, self.routing.feature_hook = self.routing.feature_hook, None
            hook(x)
            if self.routing.bypass:  # the pass only wanted the feature (see locator_features)
                return result
        adapter_name = self.active_adapters[0]
        if adapter_name not in self.cmoe_routers or len(self.cmoe_routers[adapter_name]) == 0:
            return result
        task = self.routing.task
        if task is None:
            if len(self.cmoe_routers[adapter_name]) > 1:
                raise RuntimeError(
                    "No task is set for this forward pass and several tasks are registered: pass task=... "
                    "to the model's forward or generate."
                )
            task = 0
        delta = self._mixture(x, adapter_name, task)
        if delta is None:
            return result
        return (result + delta).to(result.dtype)

    def _align_tasks(self, tasks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample task indices matching the batch of `x` (expanded for beams / return sequences)."""
        batch = x.shape[0] if x.dim() == 3 else None
        if batch is None or batch % tasks.numel() != 0:
            raise RuntimeError(
                f"Cannot align {tasks.numel()} per-sample tasks with an input of shape {tuple(x.shape)} in "
                f"{self.layer_name}; per-sample routing needs [batch, tokens, features] inputs."
            )
        tasks = tasks.to(x.device)
        return tasks if batch == tasks.numel() else tasks.repeat_interleave(batch // tasks.numel())

    def _mixture(self, x: torch.Tensor, adapter_name: str, task: int | torch.Tensor) -> torch.Tensor | None:
        experts = self.cmoe_experts[adapter_name]
        routers = self.cmoe_routers[adapter_name]
        dropout = self.cmoe_dropout[adapter_name]
        r = experts.r
        expert_a, expert_b = experts.stacked()
        x = self._cast_input_dtype(x, expert_a.dtype)

        per_sample = present = inverse = None
        if isinstance(task, torch.Tensor):
            per_sample = self._align_tasks(task, x)
            present, inverse = torch.unique(per_sample, return_inverse=True)
            if present.numel() == 1:
                task, per_sample = int(present.item()), None

        if per_sample is None:
            router = routers.router(task)
            num_experts = router.shape[0]
            if num_experts == 0:
                return None
            expert_a, expert_b = expert_a[: num_experts * r], expert_b[: num_experts * r]
            if isinstance(dropout, nn.Identity):
                fused = F.linear(x, torch.cat([expert_a, router]))
                hidden, logits = fused.split([num_experts * r, num_experts], dim=-1)
            else:
                hidden, logits = F.linear(dropout(x), expert_a), F.linear(x, router)
        else:
            weights, visible = routers.padded(present)
            num_experts = weights.shape[1]
            expert_a, expert_b = expert_a[: num_experts * r], expert_b[: num_experts * r]
            logits = torch.einsum("bnd,bed->bne", x, weights[inverse])
            logits = logits.masked_fill(~visible[inverse][:, None, :], float("-inf"))
            hidden = F.linear(dropout(x), expert_a)

        top_k = self.top_k[adapter_name]
        routed = route(logits, top_k)
        gates = routed.gates
        beta = self.dual_router_beta[adapter_name]
        if beta is not None:
            gates = self._mix_task_gates(
                gates, routers, beta, task if per_sample is None else None, present, inverse
            )
        mask = self.routing.token_mask
        if mask is not None and tuple(mask.shape) != tuple(logits.shape[:-1]):
            mask = None
        if self.training and torch.is_grad_enabled() and self.routing.collect_aux_loss:
            self.routing.aux_losses.append(balancing_loss(routed, mask))
        if self.routing.track_usage and per_sample is None:
            self._count_usage(adapter_name, routed.assigned, mask)
        # the LoRA scaling rides on the [tokens, E] gates rather than on the [tokens, d_out] output
        gates = (gates * self.scaling[adapter_name]).to(hidden.dtype)
        hidden = rearrange(hidden, "... (e r) -> ... e r", r=r) * gates.unsqueeze(-1)
        return rearrange(hidden, "... e r -> ... (e r)") @ expert_b

    @staticmethod
    def _mix_task_gates(gates, routers: TaskRouters, beta: float, task, present, inverse) -> torch.Tensor:
        """CL-MoE's dual router: ``beta * G^I(x) + (1 - beta) * G^T(t)`` (G^I alone before G^T exists)."""
        if task is not None:
            task_gate = routers.task_gate(task)
            return gates if task_gate is None else beta * gates + (1 - beta) * task_gate.to(gates.dtype)
        task_gates, has_gate = routers.padded_task_gates(present, gates.shape[-1])
        weight = torch.where(has_gate, beta, 1.0)[inverse][:, None, None].to(gates.dtype)
        return weight * gates + (1 - weight) * task_gates[inverse][:, None, :].to(gates.dtype)

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
