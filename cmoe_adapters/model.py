"""The peft tuner: injection into any HF vision-language model, and the tuner's shared state.

`get_peft_model(model, ContinualMoEConfig(...))` builds this tuner; the `PeftModel` it returns
forwards unknown attributes here, so ``model.add_task``, ``model.tasks`` and ``task=`` on
``forward``/``generate`` work on the `PeftModel` directly. Its behaviour is written once per
concept, in mixins:

* `task_registry.TaskRegistry`: the ordered tasks, adding/removing/replaying/freezing them, and
  the task lifecycle's entry points (`lifecycle`);
* `expert_usage.ExpertUsage`: counting which experts each task's tokens chose;
* `routing_context.TaskRouting`: resolving ``task=`` (or locating it) once per forward pass or
  per ``generate`` call, and the balancing loss of the pass;
* `locator_control.LocatorControl`: the task locator's feature, decisions and fitting.

This module keeps what peft asks of a tuner: injection, key renaming, loading, unloading.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from . import ddp, fingerprint, shards
from ._peft import PREFIX
from .architectures import candidate_summary, default_target_modules, linear_layer_names
from .config import ContinualMoEConfig
from .expert_usage import ExpertUsage
from .experts import ContinualMoELayer
from .locator import FeatureBuffer, TaskLocator
from .locator_control import LocatorControl
from .routing import RoutingState
from .routing_context import NO_PENDING, GenerateWithTask, TaskRouting, TaskSpec
from .task_registry import TaskRegistry

__all__ = ["ContinualMoEModel", "GenerateWithTask", "TaskSpec"]


class ContinualMoEModel(TaskRegistry, ExpertUsage, TaskRouting, LocatorControl, BaseTuner):
    """Injects `ContinualMoELayer`s; tasks, routing and the locator come from the mixins above."""

    prefix: str = PREFIX
    tuner_layer_cls = ContinualMoELayer
    target_module_mapping: dict[str, list[str]] = {}

    # -- injection --------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: ContinualMoEConfig, adapter_name: str) -> None:
        if "_routing" not in self.__dict__:
            self._routing = RoutingState()
            self._pending_generate_task: Any = NO_PENDING
            self._generating = False
            self._in_base_pass = False
            self._captured_features: list[torch.Tensor] | None = None  # inside locator_features
            self._collect_into: FeatureBuffer | None = None
            self._feature_buffers: dict[str, FeatureBuffer] = {}
            self._default_task: str | None = None
            self._expansion_plans: dict[str, dict[str, Any]] = {}  # probe decisions awaiting their task
            self._image_token_ids: tuple[int, ...] | None = None
            self.cmoe_locator = nn.ModuleDict()
        self._install_task_keyword(model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, **kwargs)
        config = self.peft_config[adapter_name]
        fingerprint.record_or_check(model, config)  # of the base model the adapter belongs to
        device = next((p.device for p in model.parameters()), None)
        self.cmoe_locator[adapter_name] = TaskLocator(config.locator_density).to(device)
        if config.locator_feature_dim is not None:
            self._add_locator_slots(adapter_name, len(config.task_records))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.cmoe_locator.pop(adapter_name, None)

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
            if check_target_module_exists(peft_config, name)  # an excluded module's answer is falsy
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

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: ContinualMoEConfig, adapter_name: str, state_dict: dict
    ) -> dict:
        """Add the finished tasks' shard files to what peft read from ``adapter_model.safetensors``."""
        state_dict = shards.gather(model, config, adapter_name, state_dict)
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "A mixture of experts routes every token differently, so it cannot be merged into the base "
            "weights. Use unload() to get the base model back."
        )

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_task_keyword(self.model)
        return model

    # -- the active adapter ------------------------------------------------------------------------

    @property
    def _config(self) -> ContinualMoEConfig:
        return self.peft_config[self.active_adapters[0]]

    def _layers(self) -> list[ContinualMoELayer]:
        return [m for m in self.model.modules() if isinstance(m, ContinualMoELayer)]

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """DDP must not broadcast the per-task buffers at every forward (see `ddp`)."""
        return ddp.buffers_to_ignore(self)
