"""A deep copy or a pickled copy of a cmoe model is a model of its own, `generate` included.

TRL's `create_reference_model` deep-copies the policy; a copy whose `generate` still ran the
original's experts would silently generate the original's tokens.
"""

from __future__ import annotations

import copy
import pickle

import torch
from conftest import randomize_experts, tiny_llama
from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig

IDS = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
GENERATE = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def two_task_model():
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    model.add_task("a")
    model.add_task("b")
    randomize_experts(model)
    return model.eval()


def test_a_deep_copy_generates_with_its_own_experts():
    model = two_task_model()
    original = model.generate(input_ids=IDS, task="a", **GENERATE)
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(input_ids=IDS, task="a", **GENERATE), original)
    randomize_experts(twin, seed=1)  # the copy's experts now differ; the original's must not move
    with torch.no_grad():
        twin_logits = twin(input_ids=IDS, task="a").logits
    assert not torch.allclose(twin_logits, model(input_ids=IDS, task="a").logits)
    changed = twin.generate(input_ids=IDS, task="a", **GENERATE)
    assert not torch.equal(changed, original), "the copy's generate ran the original's experts"
    assert torch.equal(changed[:, : IDS.shape[1] + 1].clone()[:, -1], twin_logits[:, -1].argmax(-1))
    assert torch.equal(model.generate(input_ids=IDS, task="a", **GENERATE), original)


def test_a_pickled_model_round_trips_and_behaves_as_the_original():
    model = two_task_model()
    for task, low in (("a", 3), ("b", 50)):  # fitted locators, so that None (located) works too
        ids = torch.randint(low, low + 40, (64, 6), generator=torch.Generator().manual_seed(low))
        model.collect_locator_features([{"input_ids": ids}], task=task, progress=False)
        model.fit_locator(task)
    restored = pickle.loads(pickle.dumps(model))
    for task in ("a", "b", ["a", "b"], None):
        assert torch.equal(
            restored.generate(input_ids=IDS, task=task, **GENERATE),
            model.generate(input_ids=IDS, task=task, **GENERATE),
        )
        with torch.no_grad():
            assert torch.equal(
                restored(input_ids=IDS, task=task).logits, model(input_ids=IDS, task=task).logits
            )
    assert restored.tasks == ["a", "b"]
