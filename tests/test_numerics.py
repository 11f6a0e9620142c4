"""Numerics: the mixture against peft's own LoRA and against a naive per-expert reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_experts, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from cmoe_adapters import ContinualMoEConfig, ContinualMoELayer
from cmoe_adapters.routing import RoutingState, gates_from_logits, load_balancing_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("top_k", [1, None])
def test_one_expert_one_task_equals_peft_lora(input_ids, top_k):
    """With one expert and one task the mixture is exactly a LoRA (gate = 1)."""
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    moe = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, lora_alpha=8, num_experts=1, top_k=top_k))
    moe.add_task("only")
    lora_modules = dict(lora.named_modules())
    copied = 0
    for name, module in moe.named_modules():
        if isinstance(module, ContinualMoELayer):
            peft_layer = lora_modules[name]
            experts = module.cmoe_experts["default"]
            with torch.no_grad():
                experts.lora_A[0].copy_(peft_layer.lora_A["default"].weight)
                experts.lora_B[0].copy_(peft_layer.lora_B["default"].weight.T)
            copied += 1
    assert copied == 14
    expected = lora(input_ids=input_ids).logits
    actual = moe(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(expected, tiny_llama()(input_ids=input_ids).logits, atol=1e-3)


def naive_mixture(layer: ContinualMoELayer, x: torch.Tensor, task: int) -> torch.Tensor:
    """Loop over tokens and experts: y = W x + s * sum_e g_e(x) B_e A_e x."""
    experts, routers = layer.cmoe_experts["default"], layer.cmoe_routers["default"]
    a, b = experts.stacked()
    r, top_k, scaling = experts.r, layer.top_k["default"], layer.scaling["default"]
    router = routers.weight[task]
    out = layer.base_layer(x).clone()
    for i in range(x.shape[0]):
        logits = router @ x[i]
        chosen = range(len(logits)) if top_k is None else logits.topk(top_k).indices.tolist()
        weights = torch.softmax(logits[list(chosen)], dim=0)
        if top_k == 1:
            weights = torch.softmax(logits, dim=0)[chosen]
        for weight, e in zip(weights, chosen, strict=True):
            out[i] += scaling * weight * (b[e * r : (e + 1) * r].T @ (a[e * r : (e + 1) * r] @ x[i]))
    return out


def make_layer(num_experts=4, top_k=2, tasks=1, experts_per_task=None, seed=0) -> ContinualMoELayer:
    torch.manual_seed(seed)
    config = ContinualMoEConfig(
        r=3, lora_alpha=6, num_experts=num_experts, top_k=top_k, experts_per_task=experts_per_task
    )
    config.task_records = [{"name": f"t{i}"} for i in range(tasks)]
    layer = ContinualMoELayer(nn.Linear(16, 12), "default", config, RoutingState(), layer_name="lin")
    randomize_experts(layer, seed)
    return layer


@pytest.mark.parametrize("top_k", [1, 2, 3, None])
@pytest.mark.parametrize("task", [0, 1])
def test_stacked_mixture_equals_naive_reference(top_k, task):
    layer = make_layer(num_experts=4, top_k=top_k, tasks=2, experts_per_task=2)
    assert layer.cmoe_routers["default"].num_experts(task) == [4, 6][task]
    x = torch.randn(9, 16)
    layer.routing.reset(task)
    torch.testing.assert_close(layer(x), naive_mixture(layer, x, task), atol=1e-5, rtol=1e-5)


def test_per_sample_tasks_in_one_batch_equal_each_sample_alone():
    layer = make_layer(num_experts=2, top_k=1, tasks=3, experts_per_task=1)
    x = torch.randn(4, 5, 16)
    layer.routing.reset(torch.tensor([2, 0, 1, 0]))
    mixed = layer(x)
    for i, task in enumerate([2, 0, 1, 0]):
        layer.routing.reset(task)
        torch.testing.assert_close(mixed[i], layer(x[i : i + 1])[0], atol=1e-6, rtol=1e-6)


def test_gates_topk_and_dense():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    top2 = gates_from_logits(logits, 2)
    expected = torch.zeros(1, 4)
    expected[0, [1, 2]] = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    torch.testing.assert_close(top2, expected)
    torch.testing.assert_close(gates_from_logits(logits, None), logits.softmax(-1))
    torch.testing.assert_close(gates_from_logits(logits, 9), logits.softmax(-1))
    # top-1 keeps the full-softmax probability (Switch), so the router still gets a gradient
    top1 = gates_from_logits(logits, 1)
    expected = torch.zeros(1, 4)
    expected[0, 1] = logits.softmax(-1)[0, 1]
    torch.testing.assert_close(top1, expected)
    assert gates_from_logits(torch.tensor([[0.7]]), 1).item() == 1.0


def test_load_balancing_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    probs = logits.softmax(-1)
    fraction = torch.tensor([2 / 3, 1 / 3])  # top-1 picks experts 0, 1, 0
    expected = 2 * (fraction * probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(logits, 1), expected)
    mask = torch.tensor([True, True, False])  # the third token is padding
    expected_masked = 2 * (torch.tensor([0.5, 0.5]) * probs[:2].mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(logits, 1, mask), expected_masked)
    uniform = torch.zeros(5, 4)
    assert math.isclose(load_balancing_loss(uniform, 4).item(), 1.0, rel_tol=1e-6)
