"""A task's initial weights depend on `init_seed`, its index and the layer only, never on the global RNG."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "cmoe_" in k}


def two_tasks(global_seed: int, **config) -> dict[str, torch.Tensor]:
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1, **config))
    torch.manual_seed(global_seed)
    model.add_task("a")
    torch.rand(100)  # whatever else draws from the global RNG between tasks
    model.add_task("b")
    return adapter_state(model)


def test_initial_weights_ignore_the_global_rng_and_follow_init_seed():
    first, second = two_tasks(global_seed=1), two_tasks(global_seed=2)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = two_tasks(global_seed=1, init_seed=7)
    routers = [k for k in first if ".cmoe_routers.default.weight." in k]
    assert routers and all(not torch.equal(first[k], other[k]) for k in routers)


def test_add_task_draws_nothing_from_the_global_rng():
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    model.add_task("a")
    model.add_task("b")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_tasks_and_layers_get_different_initial_weights():
    state = two_tasks(global_seed=0)
    a_blocks = [v for k, v in state.items() if "cmoe_experts" in k and "lora_A" in k]
    flattened = [tuple(block.flatten()[:4].tolist()) for block in a_blocks]
    assert len(set(flattened)) == len(flattened), "no two layers or tasks share initial weights"


def test_init_seed_is_validated():
    with pytest.raises(ValueError, match="init_seed=-1"):
        ContinualMoEConfig(init_seed=-1)


def test_a_large_init_seed_works():
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1, init_seed=10**12))
    model.add_task("a")
    assert model.tasks == ["a"]
