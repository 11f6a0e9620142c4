"""The peft tuner: injection into any HF vision-language model, and the task registry.

`get_peft_model(model, ContinualMoEConfig(...))` builds this tuner; the `PeftModel` it returns
forwards unknown attributes here, so ``model.add_task``, ``model.tasks`` and ``task=`` on
``forward``/``generate`` work on the `PeftModel` directly.

The ``task=`` keyword is consumed before the HF model sees it: a forward pre-hook on the HF model
takes it out of the forward's keyword arguments, and the HF model's ``generate`` is wrapped (as
peft itself wraps ``prepare_inputs_for_generation``) because generate rejects unknown keywords.
During one ``generate`` call the task chosen at the start holds for every decode step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule, check_target_module_exists
from torch import nn

from ._peft import PREFIX
from .architectures import candidate_summary, default_target_modules, linear_layer_names
from .config import ContinualMoEConfig, validate_task_name
from .experts import ContinualMoELayer
from .routing import RoutingState

TaskSpec = str | Sequence[str] | None


class ContinualMoEModel(BaseTuner):
    """Injects `ContinualMoELayer`s and keeps the ordered list of tasks (in the adapter's config)."""

    prefix: str = PREFIX
    tuner_layer_cls = ContinualMoELayer
    target_module_mapping: dict[str, list[str]] = {}

    # -- injection --------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: ContinualMoEConfig, adapter_name: str) -> None:
        if "_routing" not in self.__dict__:
            self._routing = RoutingState()
            self._generating = False
        self._install_task_keyword(model)

    def _prepare_adapter_config(
        self, peft_config: ContinualMoEConfig, model_config: dict
    ) -> ContinualMoEConfig:
        """Resolve the default targets for the architecture, and fail early if nothing matches."""
        model = self.model
        model_type = model_config.get("model_type", type(model).__name__)
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model)
            if peft_config.target_modules is None:
                raise ValueError(
                    f"Cannot find the language model of this {model_type!r} model to choose default "
                    "target_modules; set target_modules=[...] in ContinualMoEConfig. Linear modules of the "
                    f"model: {candidate_summary(model)}."
                )
        matched = [
            name
            for name in linear_layer_names(model)
            if (hit := check_target_module_exists(peft_config, name)) and not isinstance(hit, _ExcludedModule)
        ]
        if not matched:
            raise ValueError(
                f"target_modules={peft_config.target_modules!r} (exclude_modules="
                f"{peft_config.exclude_modules!r}) match no torch.nn.Linear of this {model_type!r} model. "
                f"Candidate linear modules: {candidate_summary(model)}."
            )
        return peft_config

    def _create_and_replace(
        self,
        peft_config: ContinualMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if isinstance(target, ContinualMoELayer):
            target.update_layer(adapter_name, peft_config)
            return
        if not isinstance(target, nn.Linear):
            raise TypeError(
                f"target_modules matched {current_key!r}, a {type(target).__name__}; only torch.nn.Linear "
                "layers can hold LoRA experts. Narrow target_modules or add it to exclude_modules."
            )
        layer = ContinualMoELayer(target, adapter_name, peft_config, self._routing, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)
        self._replace_module(parent, target_name, layer, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...q_proj.cmoe_experts.<adapter>.lora_A.0`` -> ``...q_proj.cmoe_experts.lora_A.0``."""
        marker = f".{adapter_name}."
        head, sep, tail = key.partition(PREFIX)
        if sep and marker in tail:
            attribute, _, rest = tail.partition(marker)
            if "." not in attribute:
                return f"{head}{PREFIX}{attribute}.{rest}"
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "A mixture of experts routes every token differently, so it cannot be merged into the base "
            "weights. Use unload() to get the base model back."
        )

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_task_keyword(self.model)
        return model

    # -- tasks ------------------------------------------------------------------------------------

    @property
    def _config(self) -> ContinualMoEConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def tasks(self) -> list[str]:
        """Task names, in the order they were learnt."""
        return self._config.task_names

    def _layers(self) -> list[ContinualMoELayer]:
        return [m for m in self.model.modules() if isinstance(m, ContinualMoELayer)]

    def task_index(self, name: str) -> int:
        """Position of task `name`; a `KeyError` lists the known tasks if it is unknown."""
        try:
            return self.tasks.index(name)
        except ValueError:
            known = ", ".join(repr(t) for t in self.tasks) or "none yet (call add_task first)"
            raise KeyError(f"Unknown task {name!r}. Known tasks: {known}.") from None

    def add_task(self, name: str) -> None:
        """Start a new task: freeze all earlier experts and routers, add its experts and router.

        Only the new task's router (in every adapted layer) and the experts it adds get gradients
        afterwards. Create the optimizer after calling this.
        """
        validate_task_name(name)
        config = self._config
        if name in self.tasks:
            raise ValueError(f"Task {name!r} already exists. Known tasks: {self.tasks}.")
        if config.inference_mode:
            raise ValueError(
                "This adapter was loaded for inference; load it with PeftModel.from_pretrained(..., "
                "is_trainable=True) to add tasks."
            )
        adapter_name = self.active_adapters[0]
        config.task_records.append({"name": name})
        task = len(config.task_records) - 1
        for layer in self._layers():
            layer.add_task(adapter_name, config.new_experts_for(task, layer.layer_name))
            layer.set_trainable_task(adapter_name, task)

    # -- routing ----------------------------------------------------------------------------------

    def resolve_task(self, task: TaskSpec, batch_size: int | None = None) -> int | torch.Tensor | None:
        """Turn ``task=`` (a name, or one name per sample) into what the layers route with."""
        if task is None:
            if len(self.tasks) <= 1:
                return 0 if self.tasks else None
            raise ValueError(
                f"{len(self.tasks)} tasks are registered ({', '.join(self.tasks)}): pass task='<name>' "
                "(or a list with one task name per sample) to forward/generate."
            )
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
        losses = self._routing.aux_losses
        if not losses or self._config.router_aux_loss_coef == 0:
            return None
        return self._config.router_aux_loss_coef * torch.stack(losses).mean()

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> int | None:
        for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                return value.shape[0]
        return None

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        task = kwargs.pop("task", None)
        if self._generating:  # generate chose the task once for all its steps
            return args, kwargs
        mask = kwargs.get("attention_mask")
        token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._routing.reset(self.resolve_task(task, self._batch_size(args, kwargs)), token_mask)
        return args, kwargs

    def _task_aware_generate(self, generate: Any) -> Any:
        @functools.wraps(generate)
        def generate_with_task(*args: Any, task: TaskSpec = None, **kwargs: Any) -> Any:
            self._routing.reset(self.resolve_task(task, self._batch_size(args, kwargs)))
            self._generating = True
            try:
                return generate(*args, **kwargs)
            finally:
                self._generating = False

        generate_with_task.__cmoe_wrapped__ = generate
        return generate_with_task

    def _install_task_keyword(self, model: nn.Module) -> None:
        if getattr(model, "_cmoe_forward_hook", None) is not None:
            return
        model._cmoe_forward_hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        if callable(getattr(model, "generate", None)):
            model.generate = self._task_aware_generate(model.generate)

    @staticmethod
    def _remove_task_keyword(model: nn.Module) -> None:
        hook = model.__dict__.pop("_cmoe_forward_hook", None)
        if hook is not None:
            hook.remove()
        model.__dict__.pop("generate", None)
