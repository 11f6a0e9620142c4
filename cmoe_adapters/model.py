"""The peft tuner: injection into any HF vision-language model, and the task registry.

`get_peft_model(model, ContinualMoEConfig(...))` builds this tuner; the `PeftModel` it returns
forwards unknown attributes here, so ``model.add_task``, ``model.tasks`` and ``task=`` on
``forward``/``generate`` work on the `PeftModel` directly.

The ``task=`` keyword is consumed before the HF model sees it: a forward pre-hook on the HF model
takes it out of the forward's keyword arguments, and the HF model's ``generate`` is wrapped (as
peft itself wraps ``prepare_inputs_for_generation``) because generate rejects unknown keywords.
During one ``generate`` call the task is resolved (or located) once, at the prefill forward,
and holds for every decode step.

Task location costs no extra forward pass by default: the first adapted layer that runs pools its
own input over the prompt tokens (routing has not touched anything yet), the task locator scores
that feature, and the routing it picks is used by this layer and every later one.
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from . import ddp, shards, zero3
from ._compat import without_cache
from ._peft import PREFIX
from .architectures import candidate_summary, default_target_modules, linear_layer_names
from .config import ContinualMoEConfig, validate_task_name
from .experts import ContinualMoELayer
from .features import PromptMasks, image_token_ids, pool_features
from .locator import Assessment, FeatureBuffer, LocatorFit, TaskLocation, TaskLocator
from .routing import BASE_MODEL, RoutingState

TaskSpec = str | Sequence[str] | None
_LOCATE = object()  # resolve_task's answer when the locator must pick the task
_NO_PENDING = object()  # no generate call is waiting for its prefill forward


def _all_reduce(counts: torch.Tensor) -> torch.Tensor:
    """Sum a statistic over all processes (unchanged without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.clone()
        torch.distributed.all_reduce(counts)
    return counts


def _init_generator(seed: int, task: int, layer_name: str) -> torch.Generator:
    """The CPU generator of one layer's new weights for task `task`: a function of its arguments only."""
    mixed = (seed * 1_000_003 + task) * 4_294_967_311 + zlib.crc32(layer_name.encode())
    return torch.Generator().manual_seed(mixed % 2**63)  # any init_seed: manual_seed takes 64 bits


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


class ContinualMoEModel(BaseTuner):
    """Injects `ContinualMoELayer`s and keeps the ordered list of tasks (in the adapter's config)."""

    prefix: str = PREFIX
    tuner_layer_cls = ContinualMoELayer
    target_module_mapping: dict[str, list[str]] = {}

    # -- injection --------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: ContinualMoEConfig, adapter_name: str) -> None:
        if "_routing" not in self.__dict__:
            self._routing = RoutingState()
            self._pending_generate_task: Any = _NO_PENDING
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
        device = next((p.device for p in model.parameters()), None)
        self.cmoe_locator[adapter_name] = TaskLocator(config.locator_density).to(device)
        if config.locator_feature_dim is not None:
            self._add_locator_slots(adapter_name, len(config.task_records))

    def _add_locator_slots(self, adapter_name: str, count: int) -> None:
        """Unfitted VAE slots for `count` more tasks (once the feature dimension is known)."""
        config = self.peft_config[adapter_name]
        device = next((p.device for p in self.model.parameters()), None)
        for _ in range(count):
            self.cmoe_locator[adapter_name].add_task(
                config.locator_feature_dim,
                hidden_dim=config.locator_hidden_dim,
                latent_dim=config.locator_latent_dim,
                rank=config.locator_rank,
                device=device,
            )

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

    def add_task(
        self,
        name: str,
        *,
        expanded_layers: Sequence[str] | None = None,
        init_from: Mapping[str, Sequence[int]] | None = None,
        preferred_experts: Mapping[str, Sequence[int]] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Start a new task: freeze all earlier experts and routers, add its experts and router.

        Only the new task's router (in every adapted layer) and the experts it adds get gradients
        afterwards (every expert, with ``freeze_old_experts=False``). Create the optimizer after
        calling this. `expanded_layers` limits new experts to those layers, `init_from` names per
        layer the existing experts to copy into them, `preferred_experts` ranks per layer the old
        experts its router should reach first (at most ``router_max_experts`` in all), `details` is
        stored in the task's record (probe-guided expansion passes its decision here).
        """
        validate_task_name(name)
        if name in self.tasks:
            raise ValueError(f"Task {name!r} already exists. Known tasks: {self.tasks}.")
        if self._config.inference_mode:
            raise ValueError(
                "This adapter was loaded for inference; load it with PeftModel.from_pretrained(..., "
                "is_trainable=True) to add tasks."
            )
        record: dict[str, Any] = {"name": name, "router_max_experts": self._config.router_max_experts}
        if expanded_layers is not None:
            unknown = sorted(set(expanded_layers) - {layer.layer_name for layer in self._layers()})
            if unknown:
                raise ValueError(f"expanded_layers names layers that are not adapted: {unknown[:5]}.")
            record["expanded_layers"] = sorted(expanded_layers)
        if init_from:
            record["init_from"] = {layer: list(experts) for layer, experts in init_from.items()}
        if details:
            record.update(details)
        self._grow(record, preferred_experts)

    def _grow(self, record: dict[str, Any], preferred: Mapping[str, Sequence[int]] | None = None) -> None:
        """Append a task record and build what it adds in every layer (and its locator slot)."""
        adapter_name = self.active_adapters[0]
        config = self._config
        config.task_records.append(record)
        task = len(config.task_records) - 1
        init_from = record.get("init_from", {})
        for layer in self._layers():
            count = config.new_experts_for(task, layer.layer_name)
            copies = init_from.get(layer.layer_name)
            copies = list(copies)[:count] if copies and count else None
            # new experts concatenate or copy old ones, which ZeRO-3 may hold partitioned
            with zero3.gathered(layer.cmoe_experts[adapter_name].parameters()):
                layer.add_task(
                    adapter_name,
                    count,
                    init_from=copies,
                    max_experts=config.router_experts_for(task),
                    preferred=list((preferred or {}).get(layer.layer_name, [])),
                    generator=_init_generator(config.init_seed, task, layer.layer_name),
                )
            layer.set_trainable_task(adapter_name, task)
        if config.locator_feature_dim is not None:
            self._add_locator_slots(adapter_name, 1)

    def remove_last_task(self) -> dict[str, Any]:
        """Undo the newest `add_task` entirely (used to roll back probe experts); returns its record."""
        adapter_name = self.active_adapters[0]
        config = self._config
        if not config.task_records:
            raise ValueError("There is no task to remove.")
        previous = len(config.task_records) - 2  # the task that becomes the newest again
        for layer in self._layers():
            layer.remove_last_task(adapter_name)
            layer.set_trainable_task(adapter_name, previous if previous >= 0 else None)
        locator = self._locator
        if len(locator) == len(config.task_records):
            locator.remove_last()
        return config.task_records.pop()

    def freeze(self) -> None:
        """No parameter of the adapter gets gradients (done once a task is finished)."""
        for layer in self._layers():
            layer.set_trainable_task(self.active_adapters[0], None)

    # -- expert usage -----------------------------------------------------------------------------

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

    def replay_tasks(self, saved: ContinualMoEConfig) -> None:
        """Grow this model to the task structure of a saved config whose tasks extend ours.

        Used to resume: the weights can then be loaded with ``PeftModel.load_adapter``, after
        ``shards.remember_source(config, path)`` tells it where the finished tasks' shards are.
        """
        saved_names = saved.task_names
        if saved_names[: len(self.tasks)] != self.tasks:
            raise ValueError(
                f"The saved tasks {saved_names} do not continue this model's tasks {self.tasks}."
            )
        config = self._config
        if saved.locator_feature_dim is not None and config.locator_feature_dim is None:
            config.locator_feature_dim = saved.locator_feature_dim
            self._add_locator_slots(self.active_adapters[0], len(self.tasks))
        for record in saved.task_records[len(self.tasks) :]:
            self._grow(dict(record))

    # -- a task's life, for any training loop (see `lifecycle`) ------------------------------------

    def needs_probe(self, name: str) -> bool:
        """Whether task `name` must run `probing_task` before `learning_task` (LLaVA-CMoE's expansion)."""
        from . import lifecycle

        return lifecycle.needs_probe(self, name)

    def probing_task(self, name: str) -> contextlib.AbstractContextManager[str]:
        """LLaVA-CMoE's probe phase of task `name`: train inside the block on a share of its data."""
        from . import lifecycle

        return lifecycle.probing_task(self, name)

    def learning_task(self, name: str, progress: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Add task `name`, learn it inside the block (any loop), finish it on leaving (`lifecycle`)."""
        from . import lifecycle

        return lifecycle.learning_task(self, name, progress=progress)

    @contextlib.contextmanager
    def using_task(self, name: str) -> Iterator[None]:
        """Route every forward/generate that gives no ``task=`` through task `name` (not located).

        The trainer trains each task inside this block; it also gives oracle-task evaluation.
        """
        self.task_index(name)
        previous, self._default_task = self._default_task, name
        try:
            yield
        finally:
            self._default_task = previous

    # -- routing ----------------------------------------------------------------------------------

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
            return _LOCATE
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

    def _prompt_masks(self, kwargs: Mapping[str, Any]) -> PromptMasks:
        if self._image_token_ids is None:
            self._image_token_ids = image_token_ids(getattr(self.model, "config", None))
        return PromptMasks.from_inputs(kwargs, self._image_token_ids)

    def _pool(self, hidden: torch.Tensor, masks: PromptMasks) -> torch.Tensor:
        return pool_features(hidden, masks, self._config.locator_pooling)

    def _use_features(self, features: torch.Tensor, locate: bool) -> torch.Tensor | None:
        """Collect and/or locate with the features of this forward pass."""
        if self._captured_features is not None:  # locator_features: the pass wants nothing else
            self._captured_features.append(features)
            return None
        if self._collect_into is not None:
            self._collect_into.add(features)
        if not locate:
            return None
        return self._route_located(self._assess(features))

    def _assess(self, features: torch.Tensor) -> Assessment:
        config = self._config
        return self._locator.assess(features, config.locator_score, config.locator_open_set_fence)

    def _route_located(self, assessment: Assessment) -> torch.Tensor:
        """Each sample's task index, or `BASE_MODEL` for inputs of no learnt task (``locator_open_set``)."""
        policy = self._config.locator_open_set
        if policy == "nearest":
            return assessment.nearest
        if policy == "error":
            unknown = assessment.unknown.nonzero().flatten().tolist()  # one read, under this policy only
            if unknown:
                raise ValueError(
                    f"Samples {unknown} of this batch belong to none of the learnt tasks {self.tasks} "
                    "(they lie outside every task's open-set fence). Pass task='<name>' to route them "
                    "anyway, or set locator_open_set='base' (base model) or 'nearest'."
                )
            return assessment.nearest
        return assessment.nearest.masked_fill(assessment.unknown, BASE_MODEL)

    def _feature_from_layer_input(self, x: torch.Tensor, masks: PromptMasks, locate: bool) -> None:
        task = self._use_features(self._pool(x, masks), locate)
        if task is not None:
            self._routing.set_task(task)

    def _feature_from_base_pass(
        self, args: tuple, kwargs: Mapping[str, Any], masks: PromptMasks
    ) -> torch.Tensor:
        """The frozen base model's last hidden state: one extra forward pass (LLaVA-CMoE's feature)."""
        # generate's KV cache (whatever its keyword in this transformers) must not see this pass
        skip = {"labels", "use_cache", "output_hidden_states", "return_dict", "logits_to_keep"}
        inputs = {k: v for k, v in without_cache(kwargs).items() if k not in skip}
        self._in_base_pass, self._routing.bypass = True, True
        try:
            with torch.no_grad():
                outputs = self.model(
                    *args, **inputs, output_hidden_states=True, use_cache=False, return_dict=True
                )
        finally:
            self._in_base_pass, self._routing.bypass = False, False
        return self._pool(outputs.hidden_states[-1], masks)

    def _begin_forward(self, args: tuple, kwargs: dict, task: TaskSpec) -> None:
        """Decide the routing of one forward pass (or of one generate call, at its prefill)."""
        # a pass that only takes the locator's feature never routes: no task is needed for it
        capturing = self._captured_features is not None
        resolved = None if capturing else self.resolve_task(task, self._batch_size(args, kwargs))
        mask = kwargs.get("attention_mask")
        token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        locate = resolved is _LOCATE
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
            if self._pending_generate_task is not _NO_PENDING:
                task, self._pending_generate_task = self._pending_generate_task, _NO_PENDING
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
            self._pending_generate_task, self._generating = _NO_PENDING, False

    # -- task locator -----------------------------------------------------------------------------

    @property
    def _locator(self) -> TaskLocator:
        return self.cmoe_locator[self.active_adapters[0]]

    def _locator_fitted(self) -> list[bool]:
        fitted = self._locator.fitted
        return fitted + [False] * (len(self.tasks) - len(fitted))

    def _check_locator_fitted(self) -> None:
        unfitted = [name for name, ok in zip(self.tasks, self._locator_fitted(), strict=True) if not ok]
        if unfitted:
            raise ValueError(
                f"{len(self.tasks)} tasks are registered and no task was given, but the task locator is "
                f"not fitted for {unfitted}: call model.fit_locator(task) after training each task "
                "(ContinualMoETrainer does), or pass task='<name>' (or one name per sample)."
            )

    @torch.no_grad()
    def locator_features(self, *args: Any, **batch: Any) -> torch.Tensor:
        """The locator's feature ``[batch, d]`` of model inputs, computed only as far as needed.

        With the default feature source the adapted layers skip their work once the first one has
        handed over its input (`RoutingState.feature_only`), so the pass costs little more than
        the vision tower and the layers' element-wise operations.
        """
        batch.pop("task", None)
        self._captured_features, self._routing.feature_only = [], True
        try:
            self.model(*args, **batch)
            captured = self._captured_features
        finally:
            self._captured_features, self._routing.feature_only = None, False
            self._routing.reset(None)
        if not captured:
            raise RuntimeError("The forward pass reached no adapted layer, so no locator feature was taken.")
        return captured[0]

    @torch.no_grad()
    def task_probabilities(self, *args: Any, **batch: Any) -> torch.Tensor:
        """``p(task | input)`` as a ``[batch, tasks]`` tensor (columns in `model.tasks` order).

        The probabilities are relative to the learnt tasks; whether an input belongs to any of
        them at all is `locate_tasks(..., return_scores=True).unknown`.
        """
        return self.locate_tasks(*args, return_scores=True, **batch).probabilities

    @torch.no_grad()
    def locate_tasks(
        self, *args: Any, return_scores: bool = False, **batch: Any
    ) -> list[str | None] | TaskLocation:
        """Every sample's task by name (no labels needed), as the model routes it.

        ``None`` marks an input of none of the learnt tasks, which the base model answers
        (``locator_open_set="base"``, the default; with ``"error"`` it is what would raise).
        With `return_scores`, a `TaskLocation` also holds the probabilities, each sample's novelty
        score (higher = less like any learnt task) and the open-set decision.
        """
        if not self.tasks:
            raise ValueError("No task is registered yet: call model.add_task(name) first.")
        if self._locator_fitted() == [False]:  # one task, no locator yet: nothing to decide
            size = self._batch_size(args, batch) or 1
            tasks: list[str | None] = self.tasks * size
            nothing = torch.full((size,), float("nan"))
            location = TaskLocation(tasks, torch.ones(size, 1), nothing, torch.zeros(size, dtype=torch.bool))
            return location if return_scores else tasks
        self._check_locator_fitted()
        assessment = self._assess(self.locator_features(*args, **batch))
        refused = self._config.locator_open_set != "nearest"  # "nearest" routes unknown inputs anyway
        names = [
            None if refused and unknown else self.tasks[i]
            for i, unknown in zip(assessment.nearest.tolist(), assessment.unknown.tolist(), strict=True)
        ]
        if not return_scores:
            return names
        probabilities = self._locator.probabilities(assessment.scores, self._config.locator_temperature)
        return TaskLocation(names, probabilities.cpu(), assessment.novelty.cpu(), assessment.unknown.cpu())

    @contextlib.contextmanager
    def collecting_locator_features(self, task: str | None = None) -> Iterator[FeatureBuffer]:
        """Inside this block every forward pass also stores its locator features for `task`.

        Use it around the training of a task so that its locator is fitted without a second pass
        over the data. Defaults to the newest task.
        """
        name = task if task is not None else self.tasks[-1]
        self.task_index(name)
        buffer = self._feature_buffers.get(name)
        if buffer is None:
            buffer = FeatureBuffer(self._config.locator_max_features, seed=len(self._feature_buffers))
            self._feature_buffers[name] = buffer
        previous, self._collect_into = self._collect_into, buffer
        try:
            yield buffer
        finally:
            self._collect_into = previous

    @property
    def feature_buffer_in_use(self) -> FeatureBuffer | None:
        """The buffer that forward passes fill right now (inside `collecting_locator_features`)."""
        return self._collect_into

    def collect_locator_features(
        self, batches: Iterable[Mapping[str, Any]], task: str | None = None, progress: bool = True
    ) -> FeatureBuffer:
        """Collect locator features of `task` from model-input batches (forward stops early)."""
        from tqdm.auto import tqdm

        with self.collecting_locator_features(task) as buffer:
            for batch in tqdm(batches, desc="locator features", disable=not progress, leave=False):
                buffer.add(self.locator_features(**batch))
        return buffer

    def fit_locator(
        self, task: str | None = None, features: torch.Tensor | None = None, progress: bool = False
    ) -> LocatorFit:
        """Fit the VAE of `task` (default: newest) on its collected (or given) features; freeze it."""
        name = task if task is not None else self.tasks[-1]
        index = self.task_index(name)
        if features is None:
            buffer = self._feature_buffers.get(name)
            if buffer is None or len(buffer) == 0:
                raise ValueError(
                    f"No locator features were collected for task {name!r}: train it inside "
                    "model.collecting_locator_features(), call model.collect_locator_features(batches), "
                    "or pass features=."
                )
            features = buffer.tensor()
        config = self._config
        if features.dim() != 2:
            raise ValueError(f"Locator features must be [samples, dim], got {tuple(features.shape)}.")
        if config.locator_feature_dim is None:
            config.locator_feature_dim = features.shape[1]
            self._add_locator_slots(self.active_adapters[0], len(self.tasks))
        elif features.shape[1] != config.locator_feature_dim:
            raise ValueError(
                f"Locator features of task {name!r} have dimension {features.shape[1]}, the locator "
                f"was built for {config.locator_feature_dim}."
            )
        report = self._locator.fit(
            index,
            name,
            features,
            steps=config.locator_steps,
            lr=config.locator_lr,
            batch_size=config.locator_batch_size,
            calibration_fraction=config.locator_calibration_fraction,
            score_kind=config.locator_score,
            fence=config.locator_open_set_fence,
            seed=index,
            progress=progress,
        )
        self._feature_buffers.pop(name, None)
        return report

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

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """DDP must not broadcast the per-task buffers at every forward (see `ddp`)."""
        return ddp.buffers_to_ignore(self)
