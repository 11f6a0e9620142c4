"""The routing context of a forward pass: which task routes it, chosen once per pass or per generate.

A mixin of `ContinualMoEModel`. The ``task=`` keyword is consumed before the HF model sees it: a
forward pre-hook on the HF model takes it out of the forward's keyword arguments, and the HF
model's ``generate`` is replaced on the instance by `GenerateWithTask` (as peft itself wraps
``prepare_inputs_for_generation``), because generate rejects unknown keywords. During one
``generate`` call the task is resolved (or located) once, at the prefill forward, and holds for
every decode step. Located routing asks `LocatorControl` for the feature and the decision.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .routing import RoutingState

if TYPE_CHECKING:
    from .model import ContinualMoEModel

TaskSpec = str | Sequence[str] | None
LOCATE = object()  # resolve_task's answer when the locator must pick the task
NO_PENDING = object()  # no generate call is waiting for its prefill forward


class GenerateWithTask:
    """The HF model's ``generate`` with a ``task=`` keyword, set on the model instance.

    transformers' ``generate`` refuses keywords its model does not know, so ``task=`` must be taken
    out before it runs. This is an object holding its tuner, not a closure: `copy.deepcopy` (TRL's
    reference model) rebinds the copy's to the copied tuner, and `pickle` can store it.
    """

    def __init__(self, tuner: ContinualMoEModel) -> None:
        self.tuner = tuner

    def __call__(self, *args: Any, task: TaskSpec = None, **kwargs: Any) -> Any:
        return self.tuner._generate(args, kwargs, task)


class TaskRouting:
    """Resolving ``task=`` (or locating it), and setting every layer's routing for the pass."""

    _routing: RoutingState
    _pending_generate_task: Any
    _generating: bool
    _in_base_pass: bool

    def resolve_task(self, task: TaskSpec, batch_size: int | None = None) -> int | torch.Tensor | None:
        """Turn ``task=`` (a name, or one name per sample) into what the layers route with."""
        if task is None and self._default_task is not None:
            task = self._default_task
        if task is None:
            if not self.tasks:
                return None
            if len(self.tasks) == 1 and not (
                self._locator_fitted()[0] and self._config.locator_open_set != "nearest"
            ):
                return 0  # nothing to choose between, and no open-set decision to take
            self._check_locator_fitted()
            return LOCATE
        if isinstance(task, str):
            return self.task_index(task)
        if isinstance(task, Sequence) and all(isinstance(t, str) for t in task):
            if batch_size is not None and len(task) != batch_size:
                raise ValueError(f"task= has {len(task)} names for a batch of {batch_size} samples.")
            indices = [self.task_index(t) for t in task]
            if len(set(indices)) == 1:
                return indices[0]
            device = next((p.device for p in self.model.parameters()), None)
            return torch.tensor(indices, dtype=torch.long, device=device)
        raise TypeError(f"task= must be a task name or a list of names, got {type(task).__name__}.")

    def router_aux_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing loss of the last training forward (mean over layers), or None.

        `ContinualMoETrainer` adds it to the task loss; in a hand-written loop, add it yourself.
        """
        coef = self._config.router_aux_loss_coef
        losses = [loss for loss in self._routing.aux_losses.values() if loss is not None]
        if not losses or coef == 0:
            return None  # under reentrant checkpointing its gradient joins in backward instead
        if len(losses) == len(self._routing.aux_losses):
            return coef * torch.stack(losses).mean()
        return coef * torch.stack(losses).sum() / len(self._routing.aux_losses)  # partly checkpointed

    def router_aux_loss_value(self) -> torch.Tensor | None:
        """The weighted balancing loss of the last training forward, detached: what to log.

        Unlike `router_aux_loss` it also counts layers under reentrant activation checkpointing,
        whose loss's gradient joins in backward, so the logged value never depends on checkpointing.
        """
        coef = self._config.router_aux_loss_coef
        values = list(self._routing.aux_loss_values.values())
        if not values or coef == 0:
            return None
        return coef * torch.stack(values).mean()

    def set_aux_loss_gradient_scale(self, scale: float) -> None:
        """What the caller divides its loss by (gradient accumulation); the balancing loss's gradient
        added inside backward under reentrant checkpointing is divided likewise. Default 1."""
        self._routing.aux_gradient_scale = scale

    @staticmethod
    def _batch_size(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
        for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                return value.shape[0]
        return None

    def _begin_forward(self, args: tuple, kwargs: dict, task: TaskSpec) -> None:
        """Decide the routing of one forward pass (or of one generate call, at its prefill)."""
        # a pass that only takes the locator's feature never routes: no task is needed for it
        capturing = self._captured_features is not None
        resolved = None if capturing else self.resolve_task(task, self._batch_size(args, kwargs))
        mask = kwargs.get("attention_mask")
        token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        locate = resolved is LOCATE
        hook = None
        if locate or self._collect_into is not None or capturing:
            masks = self._prompt_masks(kwargs)
            if self._config.locator_feature_source == "base_last_hidden":
                located = self._use_features(self._feature_from_base_pass(args, kwargs, masks), locate)
                resolved = located if locate else resolved
            else:
                hook = functools.partial(self._feature_from_layer_input, masks=masks, locate=locate)
                resolved = None if locate else resolved
        self._routing.reset(resolved, token_mask, hook)
        self._routing.aux_loss_coef = self._config.router_aux_loss_coef

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        task = kwargs.pop("task", None)
        if self._in_base_pass:
            return args, kwargs
        if self._generating:  # one routing decision per generate call, taken at its prefill
            if self._pending_generate_task is not NO_PENDING:
                task, self._pending_generate_task = self._pending_generate_task, NO_PENDING
                self._begin_forward(args, kwargs, task)
            return args, kwargs
        self._begin_forward(args, kwargs, task)
        return args, kwargs

    def _generate(self, args: tuple, kwargs: dict, task: TaskSpec) -> Any:
        """The HF model's own ``generate``, with one routing decision taken at its prefill forward."""
        self.resolve_task(task, self._batch_size(args, kwargs))  # fail before generating
        self._pending_generate_task, self._generating = task, True
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            self._pending_generate_task, self._generating = NO_PENDING, False

    def _install_task_keyword(self, model: nn.Module) -> None:
        if getattr(model, "_cmoe_forward_hook", None) is not None:
            return
        model._cmoe_forward_hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        if callable(getattr(type(model), "generate", None)):
            model.generate = GenerateWithTask(self)

    @staticmethod
    def _remove_task_keyword(model: nn.Module) -> None:
        hook = model.__dict__.pop("_cmoe_forward_hook", None)
        if hook is not None:
            hook.remove()
        model.__dict__.pop("generate", None)
