"""The probabilistic task locator: one small VAE per task picks each sample's task at inference.

LLaVA-CMoE fits a VAE on a feature of each task's inputs and, when the task is unknown, uses the
router of the task whose VAE explains the input best. Two weak points are addressed here:

* **Fair comparison across tasks.** Each VAE standardises the feature with its own task's
  statistics, and its score (negative ELBO, or reconstruction error) is z-normalised with the
  scores of its own *held-out* training samples. Scores of tasks with different feature scales
  become comparable, and they turn into probabilities with a softmax.
* **Cost.** All VAEs are scored together with batched matrix products (stacked weights), so
  locating is a handful of small kernels whatever the number of tasks, and the feature itself is
  taken inside the forward pass the model does anyway (see `model.py`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_VAE_LINEARS = ("encoder.0", "encoder.2", "decoder.0", "decoder.2")


class FittedLinear(nn.Module):
    """A linear layer whose weight and bias are buffers.

    A locator is fitted by its own loop (`TaskLocator.fit`), never by the model's optimizer, so its
    weights are state rather than parameters: DDP, DeepSpeed ZeRO-3 and FSDP then keep them whole on
    every process instead of sharding them, and they never show up as trainable.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _vae_network(feature_dim: int, hidden_dim: int, latent_dim: int, linear: type[nn.Module]) -> nn.Module:
    """Encoder ``d -> h -> 2z`` and decoder ``z -> h -> d`` built from `linear` layers."""
    network = nn.Module()
    network.encoder = nn.Sequential(
        linear(feature_dim, hidden_dim), nn.SiLU(), linear(hidden_dim, 2 * latent_dim)
    )
    network.decoder = nn.Sequential(
        linear(latent_dim, hidden_dim), nn.SiLU(), linear(hidden_dim, feature_dim)
    )
    return network


class TaskVAE(nn.Module):
    """A 2-layer MLP VAE over one task's features, with that task's calibration statistics.

    Everything is a buffer (see `FittedLinear`); `TaskLocator.fit` trains an ordinary twin network
    and copies its weights in.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.dims = (feature_dim, hidden_dim, latent_dim)
        network = _vae_network(feature_dim, hidden_dim, latent_dim, FittedLinear)
        self.encoder, self.decoder = network.encoder, network.decoder
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def trainable_twin(self) -> nn.Module:
        """A freshly initialised network of the same shape with ordinary parameters, to fit."""
        twin = _vae_network(*self.dims, nn.Linear)
        return twin.to(self.feature_mean.device)

    def load_twin(self, twin: nn.Module) -> None:
        """Copy a fitted twin's weights into this VAE's buffers."""
        with torch.no_grad():
            for name in _VAE_LINEARS:
                mine, theirs = self.get_submodule(name), twin.get_submodule(name)
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)


def negative_elbo(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Negative ELBO per feature dimension of standardised features, one reparameterised sample."""
    mu, logvar = network.encoder(x).chunk(2, dim=-1)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    reconstruction = F.mse_loss(network.decoder(z), x, reduction="none").mean(-1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1) / x.shape[-1]
    return (reconstruction + kl).mean()


def stack_vaes(vaes: list[TaskVAE]) -> dict[str, torch.Tensor]:
    """The weights and statistics of several VAEs stacked along a new leading task dimension (fp32)."""
    stacked = {}
    for name in _VAE_LINEARS:
        linears = [vae.get_submodule(name) for vae in vaes]
        stacked[f"{name}.weight"] = torch.stack([linear.weight.float() for linear in linears])
        stacked[f"{name}.bias"] = torch.stack([linear.bias.float() for linear in linears])
    for name in ("feature_mean", "feature_std", "score_mean", "score_std"):
        stacked[name] = torch.stack([getattr(vae, name).float() for vae in vaes])
    stacked["fitted"] = torch.stack([vae.fitted for vae in vaes])
    return stacked


def raw_scores(stacked: dict[str, torch.Tensor], features: torch.Tensor, kind: str) -> torch.Tensor:
    """Uncalibrated scores ``[tasks, batch]`` (lower = more typical) of all stacked VAEs at once.

    The latent is the posterior mean, so scores are deterministic.
    """

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = stacked[f"{name}.weight"], stacked[f"{name}.bias"]
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    x = (features.unsqueeze(0) - stacked["feature_mean"].unsqueeze(1)) / stacked["feature_std"].unsqueeze(1)
    mu, logvar = linear("encoder.2", F.silu(linear("encoder.0", x))).chunk(2, dim=-1)
    reconstruction = linear("decoder.2", F.silu(linear("decoder.0", mu)))
    score = (reconstruction - x).pow(2).mean(-1)
    if kind == "elbo":
        score = score - 0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1) / x.shape[-1]
    return score


@dataclass
class LocatorFit:
    """What fitting one task's VAE did (for logs and the task's results)."""

    task: str
    train_samples: int
    calibration_samples: int
    final_loss: float
    score_mean: float
    score_std: float


class TaskLocator(nn.Module):
    """The VAEs of all tasks of one adapter, in task order."""

    def __init__(self) -> None:
        super().__init__()
        self.vaes = nn.ModuleList()
        self._stacked_cache: tuple[tuple, dict[str, torch.Tensor], list[bool]] | None = None
        self._generation = 0  # bumped whenever a VAE is added, removed, fitted or loaded
        self.register_load_state_dict_post_hook(lambda module, _: module._changed())

    def _changed(self) -> None:
        self._generation += 1

    def _cache_key(self) -> tuple:
        """Changes with the VAEs, and with moving them (`.to()` makes new buffers)."""
        ends = (self.vaes[0], self.vaes[-1]) if len(self.vaes) else ()
        return (self._generation, *(id(vae.feature_mean) for vae in ends))

    def __len__(self) -> int:
        return len(self.vaes)

    def add_task(
        self, feature_dim: int, hidden_dim: int, latent_dim: int, device: torch.device | None = None
    ) -> None:
        """A (not yet fitted) VAE slot for the next task, on `device` (default: the other slots')."""
        reference = next(self.buffers(), None)
        if device is None and reference is not None:
            device = reference.device
        self.vaes.append(TaskVAE(feature_dim, hidden_dim, latent_dim).to(device))
        self._changed()

    def remove_last(self) -> None:
        """Drop the newest task's VAE (rolls back a task)."""
        self.vaes = nn.ModuleList(list(self.vaes)[:-1])
        self._changed()

    @property
    def fitted(self) -> list[bool]:
        """Which tasks have a fitted VAE (read from the device once per change, not per forward)."""
        return list(self._derived()[1]) if len(self.vaes) else []

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
        seed: int = 0,
        progress: bool = False,
    ) -> LocatorFit:
        """Fit the VAE of `task` on its features, then calibrate its scores on held-out ones."""
        from tqdm.auto import tqdm

        vae = self.vaes[task]
        device = vae.feature_mean.device
        features = features.detach().to(device=device, dtype=torch.float32)
        if features.shape[0] < 4:
            raise ValueError(
                f"Task {task_name!r} has {features.shape[0]} locator features; at least 4 are needed."
            )
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(features.shape[0], generator=generator).to(device)
        held_out = max(2, round(features.shape[0] * calibration_fraction))
        calibration, train = features[order[:held_out]], features[order[held_out:]]

        mean = train.mean(0)
        std = train.std(0, unbiased=False).clamp_min(1e-4 + 1e-2 * train.std().item())
        standardised = (train - mean) / std
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # initial weights and reparameterisation noise: same fit on every process
        twin = vae.trainable_twin()
        optimizer = torch.optim.Adam(twin.parameters(), lr=lr)
        threads = torch.get_num_threads()
        if device.type == "cpu":  # tiny matrices: one thread is ~100x faster on a busy machine
            torch.set_num_threads(1)
        loss = torch.zeros(())
        try:
            for _ in tqdm(range(steps), desc=f"locator {task_name}", disable=not progress, leave=False):
                index = torch.randint(train.shape[0], (min(batch_size, train.shape[0]),), generator=generator)
                loss = negative_elbo(twin, standardised[index.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
            torch.random.set_rng_state(torch_state)

        with torch.no_grad():
            vae.load_twin(twin)
            vae.feature_mean.copy_(mean)
            vae.feature_std.copy_(std)
            scores = raw_scores(stack_vaes([vae]), calibration, score_kind)[0]
            vae.score_mean.copy_(scores.mean())
            vae.score_std.copy_(scores.std(unbiased=False).clamp_min(1e-6 + 1e-3 * scores.mean().abs()))
            vae.fitted.fill_(True)
        self._changed()
        return LocatorFit(
            task=task_name,
            train_samples=train.shape[0],
            calibration_samples=held_out,
            final_loss=float(loss.detach()),
            score_mean=float(vae.score_mean),
            score_std=float(vae.score_std),
        )

    def _derived(self) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """The stacked VAEs and their fitted flags, made (and read from the device) once per change."""
        key = self._cache_key()
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            with torch.no_grad():
                stacked = stack_vaes(list(self.vaes))
            self._stacked_cache = (key, stacked, stacked["fitted"].tolist())
        return self._stacked_cache[1], self._stacked_cache[2]

    def _stacked(self) -> dict[str, torch.Tensor]:
        return self._derived()[0]

    @torch.no_grad()
    def calibrated_scores(self, features: torch.Tensor, score_kind: str) -> torch.Tensor:
        """z-normalised scores ``[batch, tasks]``; tasks without a fitted VAE score +inf."""
        stacked = self._stacked()
        features = features.to(device=stacked["feature_mean"].device, dtype=torch.float32)
        scores = raw_scores(stacked, features, score_kind)
        scores = (scores - stacked["score_mean"].unsqueeze(1)) / stacked["score_std"].unsqueeze(1)
        scores = scores.masked_fill(~stacked["fitted"].unsqueeze(1), math.inf)
        return scores.transpose(0, 1)

    def probabilities(self, features: torch.Tensor, score_kind: str, temperature: float) -> torch.Tensor:
        """``p(task | feature)`` as ``[batch, tasks]``: softmax of the negated calibrated scores."""
        return torch.softmax(-self.calibrated_scores(features, score_kind) / temperature, dim=-1)


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
