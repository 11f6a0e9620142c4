"""Locator control: the task locator's feature, its decisions, and its fitting, on the model.

A mixin of `ContinualMoEModel`. Task location costs no extra forward pass by default: the first
adapted layer that runs pools its own input over the prompt tokens (routing has not touched
anything yet), the task locator scores that feature, and the routing it picks is used by this
layer and every later one. `locate_tasks` and `collect_locator_features` run a pass that only
takes that feature (`RoutingState.feature_only`). With ``locator_feature_source=
"base_last_hidden"`` (LLaVA-CMoE's feature) the frozen base model's last hidden state is taken in
one extra forward pass instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from ._compat import without_cache
from .features import PromptMasks, image_token_ids, pool_features
from .locator import Assessment, FeatureBuffer, LocatorFit, TaskLocation, TaskLocator
from .routing import BASE_MODEL


class LocatorControl:
    """Taking the locator's feature in a forward pass, locating with it, collecting and fitting."""

    _captured_features: list[torch.Tensor] | None
    _collect_into: FeatureBuffer | None
    _feature_buffers: dict[str, FeatureBuffer]
    _image_token_ids: tuple[int, ...] | None

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
