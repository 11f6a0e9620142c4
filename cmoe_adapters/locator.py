"""The task locator: one density model per task picks each sample's task, or none of them.

LLaVA-CMoE fits a VAE on a feature of each task's inputs and, when the task is unknown, uses the
router of the task whose VAE explains the input best. Here the density is a choice (see
`densities`): a closed-form low-rank Gaussian by default, the paper's VAE as an option. Three weak
points of the paper's locator are addressed:

* **Fair comparison across tasks.** Gaussians are normalised densities, compared by likelihood;
  VAE scores are z-normalised with each task's own *held-out* training samples.
* **Open set.** An input far outside every task's held-out scores is of *none* of the learnt
  tasks. The fence is a Tukey fence: a task accepts an input whose score is at most its held-out
  upper quartile plus ``fence`` interquartile ranges (``locator_open_set_fence``); an input no
  task accepts is unknown, and ``locator_open_set`` says what happens to it. The fence uses the
  tasks' own data only -- no example of an unknown task is needed.
* **Cost.** All densities are scored together with batched matrix products on stacked weights,
  and the feature is taken inside the forward pass the model does anyway (see `model.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from .densities import TaskDensity, TaskGaussian, TaskVAE, raw_scores, stack

# where each density kind keeps its per-task modules (also the names in the adapter's state dict)
_MODULE_LISTS = {"gaussian": "gaussians", "vae": "vaes"}


@dataclass
class LocatorFit:
    """What fitting one task's density did (for logs and the task's results)."""

    task: str
    density: str
    train_samples: int
    calibration_samples: int
    final_loss: float | None
    score_mean: float
    score_std: float
    open_set_threshold: float


@dataclass
class Assessment:
    """The locator's view of a batch: per-task scores, the nearest task, and the open-set decision.

    ``scores [B, T]``: lower is more likely (total negative log-likelihood for Gaussians, z-scores
    for VAEs; +inf for a task without a fitted density). ``novelty [B]``: how far the input lies
    beyond the fence of the task that accepts it most easily, in interquartile ranges (the
    open-set score: higher is more novel). ``unknown [B]``: ``novelty > fence``.
    """

    scores: torch.Tensor
    nearest: torch.Tensor
    novelty: torch.Tensor
    unknown: torch.Tensor


@dataclass
class TaskLocation:
    """`locate_tasks(..., return_scores=True)`: what the locator decided for each sample.

    ``tasks``: the task each sample is routed through, ``None`` where the base model answers.
    ``probabilities [B, T]``: ``p(task | input)`` among the learnt tasks. ``novelty [B]``: the
    open-set score (see `Assessment`). ``unknown [B]``: outside every task's fence (also reported
    under ``locator_open_set="nearest"``, which routes such inputs to their nearest task anyway).
    """

    tasks: list[str | None]
    probabilities: torch.Tensor
    novelty: torch.Tensor
    unknown: torch.Tensor


def held_out_split(
    count: int, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(held_out, kept)`` of `count` features: `fraction` (at least 2) held out at random."""
    order = torch.randperm(count, generator=generator)
    held_out = max(2, round(count * fraction))
    return order[:held_out], order[held_out:]


def _after_load(module: TaskLocator, incompatible_keys: object) -> None:
    module._changed()


class TaskLocator(nn.Module):
    """The density models of all tasks of one adapter, in task order."""

    def __init__(self, density: str = "gaussian") -> None:
        super().__init__()
        if density not in _MODULE_LISTS:
            raise ValueError(f"Unknown locator density {density!r}; choose one of {tuple(_MODULE_LISTS)}.")
        self.density = density
        setattr(self, _MODULE_LISTS[density], nn.ModuleList())
        self._stacked_cache: tuple[tuple, dict[str, torch.Tensor], list[bool]] | None = None
        self._generation = 0  # bumped whenever a density is added, removed, fitted or loaded
        self.register_load_state_dict_post_hook(_after_load)  # a function, not a lambda: pickles

    @property
    def densities(self) -> nn.ModuleList:
        return getattr(self, _MODULE_LISTS[self.density])

    def _changed(self) -> None:
        self._generation += 1

    def _cache_key(self) -> tuple:
        """Changes with the densities, and with moving them (`.to()` makes new buffers)."""
        densities = self.densities
        ends = (densities[0], densities[-1]) if len(densities) else ()
        return (self._generation, *(id(d.feature_mean) for d in ends))

    def __len__(self) -> int:
        return len(self.densities)

    def add_task(
        self,
        feature_dim: int,
        *,
        hidden_dim: int,
        latent_dim: int,
        rank: int,
        device: torch.device | None = None,
    ) -> None:
        """A (not yet fitted) density for the next task, on `device` (default: the other tasks')."""
        reference = next(self.buffers(), None)
        if device is None and reference is not None:
            device = reference.device
        if self.density == "gaussian":
            density: TaskDensity = TaskGaussian(feature_dim, rank)
        else:
            density = TaskVAE(feature_dim, hidden_dim, latent_dim)
        self.densities.append(density.to(device))
        self._changed()

    def remove_last(self) -> None:
        """Drop the newest task's density (rolls back a task)."""
        setattr(self, _MODULE_LISTS[self.density], nn.ModuleList(list(self.densities)[:-1]))
        self._changed()

    @property
    def fitted(self) -> list[bool]:
        """Which tasks have a fitted density (read from the device once per change, not per forward)."""
        return list(self._derived()[1]) if len(self) else []

    def fit(
        self,
        task: int,
        task_name: str,
        features: torch.Tensor,
        *,
        steps: int,
        lr: float,
        batch_size: int,
        calibration_fraction: float,
        score_kind: str,
        fence: float,
        seed: int = 0,
        progress: bool = False,
    ) -> LocatorFit:
        """Fit the density of `task` on its features, then calibrate it on held-out ones.

        Every random draw (the held-out split; a VAE's initial weights, batches and noise) comes
        from a local generator seeded by `seed`: the global RNGs are never touched, and every
        process fits the same locator.
        """
        density = self.densities[task]
        device = density.feature_mean.device
        features = features.detach().to(device=device, dtype=torch.float32)
        if features.shape[0] < 4:
            raise ValueError(
                f"Task {task_name!r} has {features.shape[0]} locator features; at least 4 are needed."
            )
        generator = torch.Generator().manual_seed(seed)
        held_out, kept = held_out_split(features.shape[0], calibration_fraction, generator)
        calibration, train = features[held_out.to(device)], features[kept.to(device)]
        loss = None
        if isinstance(density, TaskGaussian):
            density.fit(train)
        else:
            loss = density.fit(
                train, steps=steps, lr=lr, batch_size=batch_size, generator=generator, progress=progress
            )
        with torch.no_grad():
            density.calibrate(raw_scores(stack([density]), calibration, score_kind)[0])
        self._changed()
        return LocatorFit(
            task=task_name,
            density=self.density,
            train_samples=train.shape[0],
            calibration_samples=held_out.numel(),
            final_loss=loss,
            score_mean=float(density.score_mean),
            score_std=float(density.score_std),
            open_set_threshold=float(density.score_upper + fence * density.score_spread),
        )

    def _derived(self) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """The stacked densities and their fitted flags, made (and read from the device) once per change."""
        key = self._cache_key()
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            with torch.no_grad():
                stacked = stack(list(self.densities))
            self._stacked_cache = (key, stacked, stacked["fitted"].tolist())
        return self._stacked_cache[1], self._stacked_cache[2]

    @torch.no_grad()
    def assess(self, features: torch.Tensor, score_kind: str, fence: float) -> Assessment:
        """Score `features` ``[B, d]`` against every task at once (a few batched kernels, no host read)."""
        stacked = self._derived()[0]
        features = features.to(device=stacked["feature_mean"].device, dtype=torch.float32)
        raw = raw_scores(stacked, features, score_kind)  # [T, B]
        fitted = stacked["fitted"].unsqueeze(1)
        if self.density == "gaussian":
            scores = raw * features.shape[-1]  # total negative log-likelihood: Bayes' rule
        else:
            scores = (raw - stacked["score_mean"].unsqueeze(1)) / stacked["score_std"].unsqueeze(1)
        scores = scores.masked_fill(~fitted, float("inf")).transpose(0, 1)
        beyond = (raw - stacked["score_upper"].unsqueeze(1)) / stacked["score_spread"].unsqueeze(1)
        novelty = beyond.masked_fill(~fitted, float("inf")).amin(0)
        return Assessment(scores, scores.argmin(dim=-1), novelty, novelty > fence)

    def probabilities(self, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        """``p(task | feature)`` ``[B, T]`` from `assess`'s scores: softmax of their negation."""
        return torch.softmax(-scores / temperature, dim=-1)


class FeatureBuffer:
    """A uniform sample (reservoir) of at most `capacity` feature vectors seen during training.

    Algorithm R: row number ``n`` (1-based, counted over every `add`) fills the next free slot
    while fewer than `capacity` rows are kept, and afterwards replaces slot ``randint(0, n)`` if
    that is below `capacity`. `add` runs at every training step, so it costs no device->host
    sync and no per-row Python: the rows live in one preallocated fp32 tensor on the features'
    device, filled with vectorised index writes, and the slot decisions come from the buffer's
    own CPU `torch.Generator` (seeded by `seed`), uploaded without blocking.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"A feature buffer needs capacity >= 1, got {capacity}.")
        self.capacity = capacity
        self.seen = 0
        self._kept = 0
        self._rows: torch.Tensor | None = None  # [capacity, dim] fp32, the first `_kept` rows valid
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self._kept

    def _reservoir(self, features: torch.Tensor) -> torch.Tensor:
        dim = features.shape[1]
        if self._rows is None:
            self._rows = torch.empty(self.capacity, dim, device=features.device, dtype=torch.float32)
        elif self._rows.shape[1] != dim:
            raise ValueError(
                f"Locator features of dimension {dim} added to a buffer of dimension {self._rows.shape[1]}."
            )
        elif self._rows.device != features.device:  # e.g. rows restored on the CPU, training on a GPU
            self._rows = self._rows.to(features.device)
        return self._rows

    def add(self, features: torch.Tensor) -> None:
        """Offer every row of `features` ``[batch, dim]`` to the sample (no host sync)."""
        if features.dim() != 2:
            raise ValueError(f"Locator features must be [batch, dim], got {tuple(features.shape)}.")
        count = features.shape[0]
        if count == 0:
            return
        features = features.detach()
        rows = self._reservoir(features)
        fill = min(count, self.capacity - self._kept)
        if fill > 0:
            rows[self._kept : self._kept + fill].copy_(features[:fill])
            self._kept += fill
        first = self.seen + fill + 1  # the row number (1-based) of the first row not simply kept
        self.seen += count
        if fill == count:
            return
        numbers = torch.arange(first, self.seen + 1, dtype=torch.float64)
        draws = torch.rand(numbers.shape[0], generator=self._generator, dtype=torch.float64)
        slots = torch.minimum((draws * numbers).floor(), numbers - 1).long()  # uniform in [0, n)
        kept = torch.nonzero(slots < self.capacity).flatten()  # CPU tensors: no device sync
        if kept.numel() == 0:
            return
        # several rows of one batch may pick the same slot: the last one wins, as one by one
        targets, inverse = torch.unique(slots[kept], return_inverse=True)
        winners = torch.full(targets.shape, -1, dtype=torch.long)
        winners.scatter_reduce_(0, inverse, kept, reduce="amax")
        index = torch.stack([targets, winners + fill])
        if rows.device.type == "cuda":
            index = index.pin_memory()
        index = index.to(rows.device, non_blocking=True)
        rows.index_copy_(0, index[0], features.index_select(0, index[1]).to(torch.float32))

    def tensor(self) -> torch.Tensor:
        """The kept rows ``[len(self), dim]`` (fp32, on the device the features came from)."""
        if self._rows is None or self._kept == 0:
            raise ValueError("No locator features were collected.")
        return self._rows[: self._kept].clone()

    def random_state(self) -> list[int]:
        """The sampler's state as a JSON-friendly list of ints (saved with Trainer checkpoints)."""
        return self._generator.get_state().tolist()

    def restore(self, rows: torch.Tensor, seen: int, random_state: list) -> None:
        """Continue from a checkpoint: the kept rows, how many were seen, the sampler's state."""
        if rows.dim() != 2 or rows.shape[0] != min(seen, self.capacity):
            raise ValueError(
                f"Cannot restore {tuple(rows.shape)} kept rows after {seen} seen into a buffer of "
                f"capacity {self.capacity} (it keeps min(seen, capacity) rows)."
            )
        if len(random_state) == 3 and isinstance(random_state[1], list):
            # a checkpoint of the former sampler (Python's `random`): continue deterministically from it
            legacy = random.Random()
            legacy.setstate((random_state[0], tuple(random_state[1]), random_state[2]))
            self._generator.manual_seed(legacy.getrandbits(63))
        else:
            self._generator.set_state(torch.tensor(random_state, dtype=torch.uint8))
        self._rows = torch.empty(self.capacity, rows.shape[1], device=rows.device, dtype=torch.float32)
        self._rows[: rows.shape[0]].copy_(rows)
        self._kept = rows.shape[0]
        self.seen = seen
