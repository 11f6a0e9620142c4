"""Per-task density models of the locator's feature: a low-rank Gaussian (default) or a VAE.

Both keep everything in buffers (`FittedLinear`, plain tensors): they are fitted by their own
closed-form solve or loop, never by the model's optimizer, so DDP, ZeRO-3 and FSDP keep them whole
on every process and they never show up as trainable. Each scores a batch of features against all
tasks at once from weights stacked along a leading task dimension.

* **Gaussian** (``locator_density="gaussian"``): probabilistic PCA of the task's standardised
  feature -- mean, the ``rank`` leading principal directions with their variances, one residual
  variance for the rest -- fitted in closed form (an SVD: no random state, no steps). Its score is
  the negative log-likelihood per dimension, a normalised density, so a task with a broad
  distribution pays for it in its log-determinant and cannot "explain" every input. Tasks are
  compared by likelihood (Bayes' rule with equal priors).
* **VAE** (``locator_density="vae"``, LLaVA-CMoE's): a 2-layer MLP VAE fitted by Adam; its score
  (negative ELBO or reconstruction error) is not a normalised density, so tasks are compared by
  scores z-normalised with each task's held-out samples.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DENSITIES = ("gaussian", "vae")
_VAE_LINEARS = ("encoder.0", "encoder.2", "decoder.0", "decoder.2")


class FittedLinear(nn.Module):
    """A linear layer whose weight and bias are buffers (fitted by the locator, not the optimizer)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class TaskDensity(nn.Module):
    """What every task's density keeps besides its model: standardisation and score calibration.

    ``score_mean``/``score_std`` z-normalise its scores, ``score_upper``/``score_spread`` (upper
    quartile and interquartile range of its held-out scores) place the open-set fence. A density
    saved before the open set existed keeps ``score_upper=inf``: it never calls an input unknown.
    """

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))
        self.register_buffer("score_upper", torch.full((), math.inf))
        self.register_buffer("score_spread", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def set_standardisation(self, train: torch.Tensor) -> torch.Tensor:
        """Store the training features' mean and (floored) std; return them standardised."""
        mean = train.mean(0)
        std = train.std(0, unbiased=False).clamp_min(1e-4 + 1e-2 * train.std().item())
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        return (train - mean) / std

    def calibrate(self, held_out_scores: torch.Tensor) -> None:
        """z-normalisation and open-set fence from the scores of held-out samples of the task."""
        scores = held_out_scores.float()
        self.score_mean.copy_(scores.mean())
        self.score_std.copy_(scores.std(unbiased=False).clamp_min(1e-6 + 1e-3 * scores.mean().abs()))
        upper, spread = tukey_fence(scores)
        self.score_upper.copy_(upper)
        self.score_spread.copy_(spread)
        self.fitted.fill_(True)


def tukey_fence(held_out_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The open-set fence's anchor and unit: upper quartile and (floored) interquartile range.

    A task accepts a score up to ``upper + fence * spread``; novelty is ``(score - upper) / spread``.
    """
    scores = held_out_scores.float()
    lower, upper = torch.quantile(scores, torch.tensor([0.25, 0.75], device=scores.device))
    return upper, (upper - lower).clamp_min(1e-6 + 1e-3 * upper.abs())


class TaskGaussian(TaskDensity):
    """Probabilistic PCA of one task's standardised feature (see the module docstring)."""

    def __init__(self, feature_dim: int, rank: int) -> None:
        super().__init__(feature_dim)
        rank = max(1, min(rank, feature_dim - 1))
        self.rank = rank
        self.register_buffer("components", torch.zeros(feature_dim, rank))
        self.register_buffer("variances", torch.ones(rank))
        self.register_buffer("residual_variance", torch.ones(()))
        self.register_buffer("log_det", torch.zeros(()))

    @torch.no_grad()
    def fit(self, train: torch.Tensor) -> None:
        """Maximum-likelihood PPCA (Tipping & Bishop) of `train`, with a floor on the residual variance.

        With fewer samples than dimensions most eigenvalues are zero; the residual variance is kept
        above 1e-3 of the mean variance so that unseen directions are unlikely but not impossible.
        """
        z = self.set_standardisation(train).double()  # centred: the mean is the training mean
        samples, dim = z.shape
        singular = torch.linalg.svd(z, full_matrices=False)
        eigenvalues = singular.S.pow(2) / samples
        rank = min(self.rank, samples - 1, dim)
        total = eigenvalues.sum()
        rest = (total - eigenvalues[:rank].sum()) / max(dim - rank, 1)
        residual = rest.clamp_min(1e-3 * total / dim + 1e-12)
        variances = torch.full((self.rank,), float(residual), dtype=torch.float64, device=z.device)
        variances[:rank] = eigenvalues[:rank].clamp_min(residual)
        components = torch.zeros(dim, self.rank, dtype=torch.float64, device=z.device)
        components[:, :rank] = singular.Vh[:rank].T
        log_det = variances.log().sum() + (dim - self.rank) * residual.log()
        log_det = log_det + 2 * self.feature_std.double().log().sum()  # back to the raw feature's scale
        self.components.copy_(components)
        self.variances.copy_(variances)
        self.residual_variance.copy_(residual)
        self.log_det.copy_(log_det)


class TaskVAE(TaskDensity):
    """A 2-layer MLP VAE over one task's standardised features (LLaVA-CMoE's locator)."""

    def __init__(self, feature_dim: int, hidden_dim: int, latent_dim: int) -> None:
        super().__init__(feature_dim)
        self.dims = (feature_dim, hidden_dim, latent_dim)
        network = _vae_network(feature_dim, hidden_dim, latent_dim, FittedLinear)
        self.encoder, self.decoder = network.encoder, network.decoder

    def fit(
        self,
        train: torch.Tensor,
        *,
        steps: int,
        lr: float,
        batch_size: int,
        generator: torch.Generator,
        progress: bool = False,
    ) -> float:
        """Adam on the negative ELBO, every random draw from `generator`; returns the last loss."""
        from tqdm.auto import tqdm

        standardised = self.set_standardisation(train)
        device = standardised.device
        # built on the meta device and initialised from `generator` (nn.Linear's own uniform bounds),
        # so that fitting never draws from, nor depends on, the global RNG
        twin = _vae_network(*self.dims, functools.partial(nn.Linear, device="meta")).to_empty(device=device)
        with torch.no_grad():
            for name in _VAE_LINEARS:
                linear = twin.get_submodule(name)
                bound = 1 / math.sqrt(linear.in_features)
                for tensor in (linear.weight, linear.bias):
                    tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)
        optimizer = torch.optim.Adam(twin.parameters(), lr=lr)
        threads = torch.get_num_threads()
        if device.type == "cpu":  # tiny matrices: one thread is ~100x faster on a busy machine
            torch.set_num_threads(1)
        loss = torch.zeros(())
        try:
            for _ in tqdm(range(steps), desc="locator VAE", disable=not progress, leave=False):
                size = min(batch_size, standardised.shape[0])
                index = torch.randint(standardised.shape[0], (size,), generator=generator)
                loss = negative_elbo(twin, standardised[index.to(device)], generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
        with torch.no_grad():
            for name in _VAE_LINEARS:
                mine, theirs = self.get_submodule(name), twin.get_submodule(name)
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
        return float(loss.detach())


def _vae_network(
    feature_dim: int, hidden_dim: int, latent_dim: int, linear: Callable[..., nn.Module]
) -> nn.Module:
    """Encoder ``d -> h -> 2z`` and decoder ``z -> h -> d`` built from `linear` layers."""
    network = nn.Module()
    network.encoder = nn.Sequential(
        linear(feature_dim, hidden_dim), nn.SiLU(), linear(hidden_dim, 2 * latent_dim)
    )
    network.decoder = nn.Sequential(
        linear(latent_dim, hidden_dim), nn.SiLU(), linear(hidden_dim, feature_dim)
    )
    return network


def negative_elbo(network: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Negative ELBO per feature dimension of standardised features, one reparameterised sample."""
    mu, logvar = network.encoder(x).chunk(2, dim=-1)
    noise = torch.randn(mu.shape, generator=generator).to(mu.device)
    z = mu + noise * (0.5 * logvar).exp()
    reconstruction = F.mse_loss(network.decoder(z), x, reduction="none").mean(-1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1) / x.shape[-1]
    return (reconstruction + kl).mean()


_CALIBRATION = ("feature_mean", "feature_std", "score_mean", "score_std", "score_upper", "score_spread")


def stack(densities: list[TaskDensity]) -> dict[str, torch.Tensor]:
    """The buffers of several densities of one kind, stacked along a leading task dimension (fp32)."""
    stacked = {name: torch.stack([getattr(d, name).float() for d in densities]) for name in _CALIBRATION}
    stacked["fitted"] = torch.stack([d.fitted for d in densities])
    if isinstance(densities[0], TaskGaussian):
        for name in ("components", "variances", "residual_variance", "log_det"):
            stacked[name] = torch.stack([getattr(d, name).float() for d in densities])
    else:
        for name in _VAE_LINEARS:
            linears = [d.get_submodule(name) for d in densities]
            stacked[f"{name}.weight"] = torch.stack([linear.weight.float() for linear in linears])
            stacked[f"{name}.bias"] = torch.stack([linear.bias.float() for linear in linears])
    return stacked


def raw_scores(stacked: dict[str, torch.Tensor], features: torch.Tensor, kind: str) -> torch.Tensor:
    """Uncalibrated scores ``[tasks, batch]`` (lower = more typical) of all stacked densities at once.

    Gaussian: negative log-likelihood per dimension (`kind` is ignored). VAE: reconstruction error
    of the posterior mean, plus the KL term with ``kind="elbo"``. Both are deterministic.
    """
    x = (features.unsqueeze(0) - stacked["feature_mean"].unsqueeze(1)) / stacked["feature_std"].unsqueeze(1)
    if "components" in stacked:
        projected = torch.bmm(x, stacked["components"])  # [T, B, rank]
        residual = stacked["residual_variance"][:, None]
        shrink = 1 - residual / stacked["variances"]  # [T, rank]
        mahalanobis = (x.pow(2).sum(-1) - (projected.pow(2) * shrink[:, None, :]).sum(-1)) / residual
        dim = x.shape[-1]
        return 0.5 * (mahalanobis + stacked["log_det"][:, None]) / dim + 0.5 * math.log(2 * math.pi)

    def linear(name: str, inputs: torch.Tensor) -> torch.Tensor:
        weight, bias = stacked[f"{name}.weight"], stacked[f"{name}.bias"]
        return torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))

    mu, logvar = linear("encoder.2", F.silu(linear("encoder.0", x))).chunk(2, dim=-1)
    reconstruction = linear("decoder.2", F.silu(linear("decoder.0", mu)))
    score = (reconstruction - x).pow(2).mean(-1)
    if kind == "elbo":
        score = score - 0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1) / x.shape[-1]
    return score
