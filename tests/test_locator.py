"""Task locator: per-sample location inside the one forward pass, generation, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_experts, tiny_llama
from peft import PeftModel, get_peft_model

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters._compat import enable_activation_checkpointing
from cmoe_adapters.densities import raw_scores, stack
from cmoe_adapters.locator import TaskLocator

# Each synthetic task speaks its own slice of the vocabulary, as VQA tasks differ in wording.
VOCAB = {"low": (3, 30), "mid": (33, 60), "high": (63, 90)}


def task_batch(task: str, n: int, seed: int, length: int = 16) -> torch.Tensor:
    low, high = VOCAB[task]
    return torch.randint(low, high, (n, length), generator=torch.Generator().manual_seed(seed))


def located_model(feature_source: str = "first_layer_input", steps: int = 150, **config) -> PeftModel:
    """Three tasks, each trained a little inside collecting_locator_features, locators fitted."""
    defaults = {"r": 4, "num_experts": 2, "top_k": 1, "locator_steps": steps, "locator_hidden_dim": 32}
    cfg = ContinualMoEConfig(**{**defaults, **config}, locator_feature_source=feature_source)
    model = get_peft_model(tiny_llama(), cfg)
    for i, task in enumerate(VOCAB):
        model.add_task(task)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        with model.collecting_locator_features():
            for step in range(6):
                ids = task_batch(task, 16, seed=100 * i + step)
                loss = model(input_ids=ids, labels=ids, task=task).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        model.eval()
        report = model.fit_locator()
        assert report.task == task and report.train_samples + report.calibration_samples == 96
    randomize_experts(model)
    return model


@pytest.fixture(scope="module")
def model() -> PeftModel:
    return located_model()


def test_locator_identifies_held_out_inputs(model):
    correct = 0
    for i, task in enumerate(VOCAB):
        correct += model.locate_tasks(input_ids=task_batch(task, 20, seed=999 + i)).count(task)
    assert correct / 60 >= 0.9
    probabilities = model.task_probabilities(input_ids=task_batch("mid", 4, seed=5))
    assert probabilities.shape == (4, 3)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))


def correctly_located(model: PeftModel, tasks: list[str], seed: int) -> tuple[torch.Tensor, list[str]]:
    """One sample per task name that the locator gets right (searching a few seeds)."""
    rows = []
    for i, task in enumerate(tasks):
        for attempt in range(20):
            ids = task_batch(task, 1, seed=seed + 100 * i + attempt)
            if model.locate_tasks(input_ids=ids) == [task]:
                rows.append(ids)
                break
    assert len(rows) == len(tasks)
    return torch.cat(rows), tasks


def test_mixed_batch_is_routed_per_sample_like_each_sample_alone(model):
    ids, tasks = correctly_located(model, ["high", "low", "mid", "low"], seed=40)
    assert model.locate_tasks(input_ids=ids) == tasks
    located = model(input_ids=ids).logits
    torch.testing.assert_close(located, model(input_ids=ids, task=tasks).logits, atol=1e-5, rtol=1e-5)
    for i, task in enumerate(tasks):
        alone = model(input_ids=ids[i : i + 1], task=task).logits
        torch.testing.assert_close(located[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(located, model(input_ids=ids, task="low").logits, atol=1e-4)


def count_forwards(model: PeftModel) -> list[int]:
    calls = [0]
    model.get_base_model().register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_generation_with_located_tasks_equals_true_tasks_with_one_forward_per_step(model):
    ids, tasks = correctly_located(model, ["mid", "high", "low"], seed=70)
    calls = count_forwards(model)
    kwargs = {"input_ids": ids, "max_new_tokens": 5, "do_sample": False}
    explicit = model.generate(**kwargs, task=tasks)
    explicit_calls, calls[0] = calls[0], 0
    located = model.generate(**kwargs)
    assert torch.equal(located, explicit)
    assert calls[0] == explicit_calls == 5, "locating must not add a forward pass"


def test_training_collects_each_sample_once_even_with_gradient_checkpointing():
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    model.add_task("low")
    enable_activation_checkpointing(model, use_reentrant=False)
    model.train()
    ids = task_batch("low", 5, seed=0)
    with model.collecting_locator_features() as buffer:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert len(buffer) == 5 and buffer.tensor().shape == (5, 32)


def test_features_pool_the_prompt_only_never_the_answer():
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    model.add_task("low")
    prompt = task_batch("low", 2, seed=1, length=6)
    answers = [task_batch("high", 2, seed=s, length=3) for s in (2, 3)]
    features = []
    for answer in answers:
        ids = torch.cat([prompt, answer], dim=1)
        labels = torch.cat([torch.full_like(prompt, -100), answer], dim=1)
        with model.collecting_locator_features() as buffer:
            model(input_ids=ids, labels=labels)
        features.append(buffer.tensor()[-2:])
    torch.testing.assert_close(features[0], features[1])
    torch.testing.assert_close(features[0], model.locator_features(input_ids=prompt))


def test_save_and_load_keep_vaes_and_calibration(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert reloaded.peft_config["default"].locator_feature_dim == 32
    ids = torch.cat([task_batch(task, 3, seed=7) for task in VOCAB])
    torch.testing.assert_close(
        reloaded.task_probabilities(input_ids=ids), model.task_probabilities(input_ids=ids)
    )
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # a later task can still be added and located after reloading for training
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    trainable.add_task("extra")
    assert trainable.base_model._locator.fitted == [True, True, True, False]
    with pytest.raises(ValueError, match=r"not fitted for \['extra'\]"):
        trainable(input_ids=ids)


def test_locator_state_is_fitted_buffers_not_parameters(model):
    """Sharding (ZeRO-3) and optimizers must never see the locator: it is fitted by its own solve."""
    assert not any("cmoe_locator" in name for name, _ in model.named_parameters())
    components = [
        b for name, b in model.named_buffers() if "cmoe_locator" in name and name.endswith(".components")
    ]
    assert len(components) == 3, "one Gaussian per task"
    assert all(float(c.abs().sum()) > 0 for c in components), "fitted, not left at zero"


def test_one_task_needs_no_locator(input_ids):
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    model.add_task("only")
    assert model.locate_tasks(input_ids=input_ids) == ["only"] * 3
    calls = count_forwards(model)
    model.generate(input_ids=input_ids, max_new_tokens=2)
    assert calls[0] == 2


def test_unfitted_locator_and_bad_features_fail_clearly(input_ids):
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    model.add_task("a")
    model.add_task("b")
    with pytest.raises(ValueError, match=r"not fitted for \['a', 'b'\].*task='<name>'"):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match="No locator features were collected for task 'b'"):
        model.fit_locator()
    with pytest.raises(ValueError, match="at least 4"):
        model.fit_locator("a", features=torch.randn(3, 32))
    model.fit_locator("a", features=torch.randn(20, 32))
    with pytest.raises(ValueError, match="dimension 16"):
        model.fit_locator("b", features=torch.randn(20, 16))
    with pytest.raises(KeyError, match="Unknown task 'c'"):
        model.fit_locator("c", features=torch.randn(20, 32))


def test_paper_feature_costs_one_extra_forward_and_also_locates():
    model = located_model(feature_source="base_last_hidden", locator_pooling="last", steps=100)
    ids, tasks = correctly_located(model, ["mid", "low"], seed=80)
    calls = count_forwards(model)
    located = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert calls[0] == 3 + 1
    assert torch.equal(located, model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, task=tasks))
    with torch.no_grad():
        hidden = tiny_llama()(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(model.locator_features(input_ids=ids), hidden)


@pytest.mark.parametrize("density", ["gaussian", "vae"])
def test_stacked_scoring_equals_scoring_each_density_alone(density):
    locator = TaskLocator(density)
    for _ in range(3):
        locator.add_task(6, hidden_dim=8, latent_dim=2, rank=3)
    features = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    for index in range(3):
        locator.fit(
            index,
            f"t{index}",
            features * (1 + index) + index,
            steps=20,
            lr=1e-2,
            batch_size=16,
            calibration_fraction=0.25,
            score_kind="elbo",
            fence=3.0,
        )
    probe = torch.randn(5, 6)
    together = raw_scores(stack(list(locator.densities)), probe, "elbo")
    for index, density_model in enumerate(locator.densities):
        torch.testing.assert_close(together[index], raw_scores(stack([density_model]), probe, "elbo")[0])
    assessment = locator.assess(probe, "elbo", fence=3.0)
    one = locator.densities[1]
    # VAE scores are compared z-normalised, Gaussians by total negative log-likelihood
    expected = (together[1] - one.score_mean) / one.score_std if density == "vae" else together[1] * 6
    torch.testing.assert_close(assessment.scores[:, 1], expected)
    novelty = (
        (together - torch.stack([d.score_upper for d in locator.densities])[:, None])
        / torch.stack([d.score_spread for d in locator.densities])[:, None]
    ).amin(0)
    torch.testing.assert_close(assessment.novelty, novelty)
    assert torch.equal(assessment.unknown, novelty > 3.0)


def test_locating_runs_no_adapted_layer_past_the_feature_and_no_exception(model, monkeypatch):
    """`locate_tasks` takes the first adapted layer's input; later adapted layers do no work."""
    from cmoe_adapters.experts import ContinualMoELayer

    layers = [m for m in model.modules() if isinstance(m, ContinualMoELayer)]
    first_inputs: list[torch.Tensor] = []
    layers[0].register_forward_pre_hook(lambda _, args: first_inputs.append(args[0]))
    base_calls = [0]
    for layer in layers:
        layer.get_base_layer().register_forward_hook(lambda *_: base_calls.__setitem__(0, base_calls[0] + 1))
    raised: list[BaseException] = []
    original = ContinualMoELayer.forward

    def watched(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except BaseException as error:  # the old design stopped the pass with an exception
            raised.append(error)
            raise

    monkeypatch.setattr(ContinualMoELayer, "forward", watched)
    ids = task_batch("mid", 4, seed=5)
    features = model.locator_features(input_ids=ids)
    assert base_calls[0] == 0 and not raised
    assert len(first_inputs) == 1
    assert torch.equal(
        features, model.base_model._pool(first_inputs[0], model.base_model._prompt_masks({"input_ids": ids}))
    )
    assert model.locate_tasks(input_ids=ids) == ["mid"] * 4
    base_calls[0] = 0
    model(input_ids=ids, task="mid")  # an ordinary pass still runs every layer
    assert base_calls[0] == len(layers)
