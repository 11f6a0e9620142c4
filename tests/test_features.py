"""The locator's feature: which tokens are pooled, and how text and image halves are kept apart."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_vlms import IMAGE, build_tiny_vlm

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.features import PromptMasks, image_token_ids, pool_features


def test_image_token_ids_read_every_naming_convention():
    class Config:
        image_token_index = 7
        video_token_id = 9
        image_token_id = None

    assert image_token_ids(Config()) == (7, 9)
    assert image_token_ids(None) == ()


def test_text_image_mean_pools_text_and_image_tokens_apart():
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    input_ids = torch.tensor([[0, IMAGE, IMAGE, 4, 5], [3, 4, 5, 6, 7]])
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, -100, 5], [-100, -100, -100, 6, 7]])
    masks = PromptMasks.from_inputs(
        {"input_ids": input_ids, "attention_mask": attention, "labels": labels}, (IMAGE,)
    )
    features = pool_features(hidden, masks, "text_image_mean")
    # sample 0: text = position 3 only (0 is padding, 4 is the answer); image = positions 1, 2
    torch.testing.assert_close(features[0], torch.cat([hidden[0, 3], hidden[0, 1:3].mean(0)]))
    # sample 1 has no image: text = positions 0..2, image half is zeros
    torch.testing.assert_close(features[1], torch.cat([hidden[1, :3].mean(0), torch.zeros(2)]))
    torch.testing.assert_close(pool_features(hidden, masks, "mean")[0], hidden[0, 1:4].mean(0))
    torch.testing.assert_close(pool_features(hidden, masks, "last")[1], hidden[1, 2])
    moments = pool_features(hidden, masks, "text_image_moments")
    spread = hidden[0, 1:3].std(0, unbiased=False)  # the image tokens' spread, per dimension
    torch.testing.assert_close(moments[0], torch.cat([features[0], spread]))
    torch.testing.assert_close(moments[1], torch.cat([features[1], torch.zeros(2)]))


def test_text_only_models_get_the_plain_mean():
    hidden = torch.randn(2, 4, 3)
    masks = PromptMasks.from_inputs({"input_ids": torch.ones(2, 4, dtype=torch.long)}, ())
    assert masks.image is None
    for pooling in ("text_image_mean", "text_image_moments"):
        torch.testing.assert_close(pool_features(hidden, masks, pooling), hidden.mean(1))


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="text_image_mean"):
        pool_features(torch.zeros(1, 2, 3), PromptMasks(None), "max")
    with pytest.raises(ValueError, match="locator_pooling"):
        ContinualMoEConfig(locator_pooling="max")


def test_vlm_feature_changes_only_its_image_half_when_only_the_image_changes():
    vlm = build_tiny_vlm("llava")
    model = get_peft_model(vlm.model, ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    model.add_task("a")
    batch = dict(vlm.batch)
    features = model.locator_features(**batch)
    d = vlm.model.config.text_config.hidden_size
    assert features.shape == (2, 3 * d)  # text mean, image mean, image spread
    batch["pixel_values"] = batch["pixel_values"] + 1.0
    with torch.no_grad():
        changed = model.locator_features(**batch)
    # the first adapted layer's input is normalised per token, so the text part stays put exactly
    torch.testing.assert_close(changed[:, :d], features[:, :d])
    assert not torch.allclose(changed[:, d : 2 * d], features[:, d : 2 * d])
    assert not torch.allclose(changed[:, 2 * d :], features[:, 2 * d :])
