"""The locator's open set: inputs of no learnt task are flagged, and get the base model's own output."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_experts, tiny_llama
from peft import PeftModel, get_peft_model

from cmoe_adapters import ContinualMoEConfig, TaskLocation
from cmoe_adapters.locator import TaskLocator
from cmoe_adapters.metrics import auroc

# each learnt task speaks its own slice of the vocabulary; "unknown" is a slice no task learnt
VOCAB = {"low": (3, 25), "mid": (33, 55), "high": (63, 85), "unknown": (88, 97)}
LEARNT = ("low", "mid", "high")


def batch(task: str, n: int, seed: int, length: int = 12) -> torch.Tensor:
    low, high = VOCAB[task]
    return torch.randint(low, high, (n, length), generator=torch.Generator().manual_seed(seed))


def fitted_model(**config) -> PeftModel:
    settings = {"r": 4, "num_experts": 2, "top_k": 1, **config}
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(**settings))
    for i, task in enumerate(LEARNT):
        model.add_task(task)
        model.collect_locator_features(
            ({"input_ids": batch(task, 100, seed=10 * i + k)} for k in range(4)), progress=False
        )
        model.fit_locator(task)
    randomize_experts(model)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> PeftModel:
    return fitted_model()


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama()  # the same seed: the very weights the adapter was injected into


def test_unknown_inputs_are_flagged_and_learnt_ones_are_not(model):
    known = [
        model.locate_tasks(input_ids=batch(t, 60, seed=500 + i), return_scores=True)
        for i, t in enumerate(LEARNT)
    ]
    unknown = model.locate_tasks(input_ids=batch("unknown", 60, seed=600), return_scores=True)
    assert isinstance(unknown, TaskLocation)
    for task, location in zip(LEARNT, known, strict=True):
        assert location.tasks == [task] * 60, "every learnt input located to its task, none rejected"
        assert not location.unknown.any()
    assert unknown.tasks == [None] * 60 and unknown.unknown.all()
    known_novelty = torch.cat([location.novelty for location in known]).tolist()
    assert auroc(known_novelty, unknown.novelty.tolist()) == 1.0
    torch.testing.assert_close(unknown.probabilities.sum(-1), torch.ones(60))


def test_base_model_answers_unknown_samples_inside_a_mixed_batch_bit_identically(model, base):
    ids = torch.cat([batch("mid", 2, seed=1), batch("unknown", 2, seed=2), batch("low", 1, seed=3)])
    assert model.locate_tasks(input_ids=ids) == ["mid", "mid", None, None, "low"]
    with torch.no_grad():
        located = model(input_ids=ids).logits
        expected_base = base(input_ids=ids).logits
    assert torch.equal(located[2:4], expected_base[2:4]), "not close: the very same numbers"
    torch.testing.assert_close(located[:2], model(input_ids=ids[:2], task="mid").logits)
    torch.testing.assert_close(located[4:], model(input_ids=ids[4:], task="low").logits)
    assert not torch.allclose(located[:2], expected_base[:2], atol=1e-3), (
        "the learnt samples use their experts"
    )


def test_an_all_unknown_batch_and_its_generation_are_the_base_models(model, base):
    ids = batch("unknown", 3, seed=4)
    mixed = torch.cat([ids, batch("high", 1, seed=5)])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        expected = base.generate(input_ids=mixed, **kwargs)
        generated = model.generate(input_ids=mixed, **kwargs)
        beams = model.generate(input_ids=mixed, num_beams=2, **kwargs)
        base_beams = base.generate(input_ids=mixed, num_beams=2, **kwargs)
    assert torch.equal(generated[:3], expected[:3])
    assert torch.equal(generated[3:], model.generate(input_ids=mixed[3:], task="high", **kwargs))
    assert torch.equal(beams[:3], base_beams[:3]), "beams of an unknown sample also stay on the base model"


def test_nearest_policy_routes_unknown_inputs_to_their_nearest_task(model):
    ids = batch("unknown", 4, seed=6)
    config = model.peft_config["default"]
    config.locator_open_set = "nearest"
    try:
        location = model.locate_tasks(input_ids=ids, return_scores=True)
        assert None not in location.tasks and location.unknown.all(), "still reported as unknown"
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, model(input_ids=ids, task=location.tasks).logits)
    finally:
        config.locator_open_set = "base"


def test_error_policy_names_the_samples_and_how_to_route_them(model):
    ids = torch.cat([batch("low", 1, seed=7), batch("unknown", 2, seed=8)])
    config = model.peft_config["default"]
    config.locator_open_set = "error"
    try:
        with pytest.raises(ValueError, match=r"Samples \[1, 2\] of this batch belong to none of the learnt"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="task='<name>'"):
            model.generate(input_ids=ids, max_new_tokens=2, pad_token_id=0)
        assert model.locate_tasks(input_ids=ids) == ["low", None, None], "a query does not raise"
        model(input_ids=ids, task="low")  # an explicit task is never second-guessed
    finally:
        config.locator_open_set = "base"


def test_a_single_task_also_refers_unknown_inputs_to_the_base_model(base):
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    model.add_task("low")
    model.collect_locator_features(
        ({"input_ids": batch("low", 100, seed=k)} for k in range(3)), progress=False
    )
    model.fit_locator()
    randomize_experts(model)
    ids = torch.cat([batch("low", 2, seed=9), batch("unknown", 2, seed=10)])
    assert model.locate_tasks(input_ids=ids) == ["low", "low", None, None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits[2:], base(input_ids=ids).logits[2:])


def test_fitting_uses_no_global_random_state_and_does_not_depend_on_it():
    features = torch.randn(80, 8, generator=torch.Generator().manual_seed(0))
    fitted = []
    for density, global_seed in (("gaussian", 1), ("gaussian", 2), ("vae", 1), ("vae", 2)):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        locator = TaskLocator(density)
        locator.add_task(8, hidden_dim=8, latent_dim=2, rank=3)
        locator.fit(
            0, "t", features, steps=30, lr=1e-2, batch_size=16, calibration_fraction=0.25,
            score_kind="elbo", fence=10.0, seed=0,
        )  # fmt: skip
        assert torch.equal(torch.random.get_rng_state(), before), f"{density} fit moved the global RNG"
        fitted.append({k: v.clone() for k, v in locator.state_dict().items()})
    for first, second in ((fitted[0], fitted[1]), (fitted[2], fitted[3])):
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), "the fit depends on its seed only"


def test_a_locator_saved_before_the_open_set_loads_as_vaes_that_never_reject(tmp_path, base):
    model = fitted_model(locator_density="vae", locator_steps=60)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    del saved["locator_density"], saved["locator_open_set"], saved["locator_open_set_fence"]
    config_file.write_text(json.dumps(saved))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    config = reloaded.peft_config["default"]
    assert config.locator_density == "vae" and reloaded.base_model._locator.density == "vae"
    ids = torch.cat([batch("mid", 2, seed=11), batch("unknown", 2, seed=12)])
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # a fresh config still defaults to the Gaussian
    assert ContinualMoEConfig().locator_density == "gaussian"
    assert ContinualMoEConfig(locator_feature_dim=64).locator_density == "vae"


def test_bad_open_set_settings_are_refused():
    with pytest.raises(ValueError, match="locator_open_set='maybe'"):
        ContinualMoEConfig(locator_open_set="maybe")
    with pytest.raises(ValueError, match="locator_open_set_fence=-1"):
        ContinualMoEConfig(locator_open_set_fence=-1)
    with pytest.raises(ValueError, match="locator_density='knn'"):
        ContinualMoEConfig(locator_density="knn")
