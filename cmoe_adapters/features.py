"""The task locator's input: one pooled vector per sample, from hidden states of the prompt.

Kept apart from the tuner because the choice of tokens is what decides whether the locator works:
on a base whose image tokens carry most of the variance (a pretrained VLM), a plain mean over the
prompt is dominated by the image and blurs tasks that differ in their question; pooling text and
image tokens separately keeps both signals, and the image tokens' spread adds texture to their
average colour (``"text_image_moments"``, the default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

POOLINGS = ("text_image_mean", "text_image_moments", "mean", "last")

# config attributes under which Hugging Face VLMs name their image/video placeholder tokens
_IMAGE_TOKEN_ATTRIBUTES = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def image_token_ids(config: Any) -> tuple[int, ...]:
    """Placeholder token ids that stand for image (or video) patches in ``input_ids``."""
    ids = {getattr(config, name, None) for name in _IMAGE_TOKEN_ATTRIBUTES}
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))


@dataclass
class PromptMasks:
    """Which tokens of a ``[B, N]`` batch form the prompt, and which of those are image tokens."""

    prompt: torch.Tensor | None
    image: torch.Tensor | None = None

    @classmethod
    def from_inputs(cls, kwargs: Mapping[str, Any], image_ids: Iterable[int] = ()) -> PromptMasks:
        """Prompt = attended and not a label to learn; image = a placeholder id in ``input_ids``."""
        mask = kwargs.get("attention_mask")
        mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            prompt = labels == -100
            mask = prompt if mask is None or mask.shape != prompt.shape else mask & prompt
        image_ids = list(image_ids)
        if not image_ids:  # a text-only model: no image half in the feature
            return cls(mask, None)
        input_ids = kwargs.get("input_ids")
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            image = torch.isin(input_ids, torch.tensor(image_ids, device=input_ids.device))
        else:  # embeddings given directly: no placeholder ids to find, every prompt token is text
            image = torch.zeros_like(mask) if mask is not None else None
        return cls(mask, image)


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def pool_features(hidden: torch.Tensor, masks: PromptMasks, pooling: str) -> torch.Tensor:
    """``[B, N, d]`` hidden states to ``[B, d]`` in fp32 (``[B, 2d]`` for ``"text_image_mean"``,
    ``[B, 3d]`` for ``"text_image_moments"``, on a model with image tokens; on a text-only model
    both are the plain mean).

    Answer tokens never count. A sample without prompt tokens (plain language-model data) is
    pooled over all its tokens; a sample without image tokens gets zeros for the image half.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown locator pooling {pooling!r}; choose one of {POOLINGS}.")
    hidden = hidden.detach().float()
    if hidden.dim() != 3:
        raise RuntimeError(
            f"The locator feature needs [batch, tokens, features] inputs, got {tuple(hidden.shape)}."
        )
    shape, device = hidden.shape[:2], hidden.device
    prompt = masks.prompt
    if prompt is None or prompt.shape != shape:
        prompt = torch.ones(shape, dtype=torch.bool, device=device)
    prompt = prompt.to(device)
    prompt = prompt | ~prompt.any(dim=1, keepdim=True)
    if pooling == "last":
        positions = torch.arange(shape[1], device=device).expand_as(prompt)
        last = positions.masked_fill(~prompt, -1).amax(dim=1).clamp_min(0)
        return hidden[torch.arange(shape[0], device=device), last]
    if pooling == "mean" or masks.image is None:
        return _masked_mean(hidden, prompt)
    image = masks.image.to(device) if masks.image.shape == shape else torch.zeros_like(prompt)
    text = prompt & ~image
    text = text | ~text.any(dim=1, keepdim=True)  # an image-only prompt: its text half is its mean
    image = prompt & image
    image_mean = _masked_mean(hidden, image)
    parts = [_masked_mean(hidden, text), image_mean]
    if pooling == "text_image_moments":  # the image tokens' spread: texture, not only average colour
        parts.append(_masked_mean((hidden - image_mean.unsqueeze(1)).pow(2), image).sqrt())
    return torch.cat(parts, dim=-1)
