"""LLaVA-CMoE's probe-guided expansion and CL-MoE's dual router and momentum merge."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_experts, tiny_llama
from peft import PeftModel, get_peft_model
from torch import nn

from cmoe_adapters import ContinualMoEConfig, ContinualMoELayer
from cmoe_adapters.expansion import finish_probe, layers_to_expand, start_probe
from cmoe_adapters.momentum import blend, merge_newest_task, momentum_coefficients, snapshot_old_experts
from cmoe_adapters.routing import RoutingState, gates_from_logits


def layers(model) -> list[ContinualMoELayer]:
    return [m for m in model.modules() if isinstance(m, ContinualMoELayer)]


# -- expansion ---------------------------------------------------------------------------------


def test_layers_to_expand_uses_mean_minus_alpha_std():
    frequencies = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.6}
    expanded, threshold = layers_to_expand(frequencies, alpha=0.5)
    mean, std = 0.3, torch.tensor([0.1, 0.2, 0.3, 0.6]).std(unbiased=False).item()
    assert threshold == pytest.approx(mean - 0.5 * std)
    assert expanded == ["c", "d"]
    assert layers_to_expand(frequencies, alpha=0.0)[0] == ["d"]


def test_expansion_adds_experts_only_where_chosen_and_copies_the_named_expert(input_ids):
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=3, top_k=1, experts_per_task=2))
    model.add_task("a")
    randomize_experts(model)
    before = model(input_ids=input_ids, task="a").logits.clone()
    names = [layer.layer_name for layer in layers(model)]
    chosen = names[::3]
    model.add_task("b", expanded_layers=chosen, init_from={name: [2, 0] for name in chosen})
    for layer in layers(model):
        experts = layer.cmoe_experts["default"]
        if layer.layer_name in chosen:
            assert experts.num_experts == 5
            a, b = experts.stacked()
            assert torch.equal(a[12:16], a[8:12]) and torch.equal(a[16:20], a[0:4]), "copies experts 2 and 0"
            assert torch.equal(b[12:16], b[8:12])
            assert layer.cmoe_routers["default"].candidates(1)[-2:] == [3, 4], "b reaches its new experts"
        else:
            assert experts.num_experts == 3
        assert layer.cmoe_routers["default"].num_experts(1) == 3, "as many candidates as task a"
    assert torch.equal(model(input_ids=input_ids, task="a").logits, before), "old task unchanged"
    record = model.peft_config["default"].task_records[1]
    assert record["expanded_layers"] == sorted(chosen) and record["init_from"][chosen[0]] == [2, 0]
    with pytest.raises(ValueError, match="not adapted"):
        model.add_task("c", expanded_layers=["nope"])


def test_probe_phase_measures_and_rolls_back(input_ids):
    config = ContinualMoEConfig(
        r=4, num_experts=2, top_k=1, experts_per_task=1, expansion=True, expansion_alpha=0.0
    )
    model = get_peft_model(tiny_llama(), config)
    model.add_task("a")
    randomize_experts(model)
    before = model(input_ids=input_ids, task="a").logits.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    probe = start_probe(model)
    assert model.tasks == ["a", probe]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.1" in n or ".lora_B.1" in n or ".weight.1" in n for n in trainable)
    model.train()
    with model.tracking_usage():
        model(input_ids=input_ids, task=probe)
        decision = finish_probe(model)
    model.eval()
    assert model.tasks == ["a"] and model.state_dict().keys() == state.keys(), "probes are gone"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    details = decision["details"]["expansion"]
    assert set(details["probe_frequencies"]) == {layer.layer_name for layer in layers(model)}
    assert 0 < details["expanded"] <= details["layers"] == 14
    model.add_task("b", **decision)
    assert torch.equal(model(input_ids=input_ids, task="a").logits, before)
    grown = [layer.layer_name for layer in layers(model) if layer.cmoe_experts["default"].num_experts == 3]
    order = [layer.layer_name for layer in layers(model)]
    assert grown == sorted(decision["expanded_layers"], key=order.index)


def test_expanded_structure_round_trips(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1, experts_per_task=1))
    model.add_task("a")
    names = [layer.layer_name for layer in layers(model)]
    model.add_task("b", expanded_layers=names[:5], details={"expansion": {"threshold": 0.1}})
    randomize_experts(model)
    expected = model(input_ids=input_ids, task="b").logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(reloaded(input_ids=input_ids, task="b").logits, expected)
    assert reloaded.peft_config["default"].task_records[1]["expansion"] == {"threshold": 0.1}


# -- dual router -------------------------------------------------------------------------------


def test_dual_router_output_equals_a_hand_computation():
    torch.manual_seed(0)
    config = ContinualMoEConfig(
        r=2, lora_alpha=4, num_experts=3, top_k=2, dual_router=True, dual_router_beta=0.25
    )
    config.task_records = [{"name": "t"}]
    layer = ContinualMoELayer(nn.Linear(5, 4), "default", config, RoutingState(), layer_name="lin").eval()
    randomize_experts(layer)
    routers, experts = layer.cmoe_routers["default"], layer.cmoe_experts["default"]
    usage = torch.tensor([0.5, 0.0, 0.5])
    routers.usage[0].copy_(usage)
    x = torch.randn(3, 5)
    layer.routing.reset(0)
    a, b = experts.stacked()
    gates = 0.25 * gates_from_logits(x @ routers.router(0).T, 2) + 0.75 * usage
    expected = layer.base_layer(x).clone()
    for i in range(3):
        for e in range(3):
            expected[i] += 2.0 * gates[i, e] * (b[2 * e : 2 * e + 2].T @ (a[2 * e : 2 * e + 2] @ x[i]))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # before the task's usage exists, the instance gates are used alone
    routers.usage[0].zero_()
    instance_only = layer.base_layer(x).clone()
    gates = gates_from_logits(x @ routers.router(0).T, 2)
    for i in range(3):
        for e in range(3):
            instance_only[i] += 2.0 * gates[i, e] * (b[2 * e : 2 * e + 2].T @ (a[2 * e : 2 * e + 2] @ x[i]))
    torch.testing.assert_close(layer(x), instance_only, atol=1e-5, rtol=1e-5)


def test_usage_is_recorded_as_the_task_gate(input_ids):
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=4, top_k=2, dual_router=True))
    model.add_task("a")
    randomize_experts(model)
    attention_mask = torch.ones_like(input_ids)
    with model.tracking_usage():
        model(input_ids=input_ids, attention_mask=attention_mask)
    model.record_usage("a")
    for layer in layers(model):
        usage = layer.cmoe_routers["default"].usage[0]
        assert usage.sum().item() == pytest.approx(1.0)
        assert (usage * 3 * 7 * 2).round().sum().item() == pytest.approx(42)  # 21 tokens x top-2


def test_learned_task_gate_trains_with_the_task(input_ids):
    config = ContinualMoEConfig(r=4, num_experts=2, top_k=1, dual_router=True, task_gate="learned")
    model = get_peft_model(tiny_llama(), config)
    model.add_task("a")
    randomize_experts(model)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    logits = [p for n, p in model.named_parameters() if "task_logits" in n]
    assert logits and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in logits)


# -- momentum ----------------------------------------------------------------------------------


def test_momentum_coefficients_follow_expert_roles():
    new = torch.tensor([0.5, 0.5, 0.0, 0.0])  # the new task uses experts 0 and 1
    old = torch.tensor([0.9, 0.0, 0.1, 0.0])  # old tasks used 0 (and a little of 2)
    keep = momentum_coefficients(new, old, shared=0.7, new=0.3, threshold=0.5)
    torch.testing.assert_close(keep, torch.tensor([0.7, 0.3, 1.0, 1.0]))
    first = momentum_coefficients(new, None, shared=0.7, new=0.3, threshold=0.5)
    torch.testing.assert_close(first, torch.tensor([0.3, 0.3, 1.0, 1.0]))


def test_blend_formula_on_hand_made_tensors():
    before = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    after = torch.zeros(4, 2)
    keep = torch.tensor([0.7, 0.3])  # two experts of rank 2
    expected = torch.tensor([[0.7, 0.7], [1.4, 1.4], [0.9, 0.9], [1.2, 1.2]])
    torch.testing.assert_close(blend(before, after, keep, rows_per_expert=2), expected)


def test_cl_moe_merge_blends_shared_experts_and_keeps_routers(input_ids):
    model = get_peft_model(tiny_llama(), ContinualMoEConfig.cl_moe(r=2, lora_alpha=4))
    model.add_task("a")
    randomize_experts(model, seed=1)
    with model.tracking_usage():
        model(input_ids=input_ids)
    model.record_usage("a")
    assert snapshot_old_experts(model) == {}, "the first task has nothing to merge with"
    model.add_task("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A.0" in n for n in trainable), "cl_moe trains the shared experts"
    before = snapshot_old_experts(model)
    routers_before = {n: p.clone() for n, p in model.named_parameters() if "cmoe_routers" in n}
    randomize_experts(model, seed=2)  # stands for training task b (routers change too)
    after = {
        layer.layer_name: tuple(t.clone() for t in layer.cmoe_experts["default"].stacked())
        for layer in layers(model)
    }
    routers_after = {n: p.clone() for n, p in model.named_parameters() if "cmoe_routers" in n}
    with model.tracking_usage():
        model(input_ids=input_ids, task="b")
    model.record_usage("b")
    roles = merge_newest_task(model, before)
    assert sum(roles.values()) == 14 * 4
    config = model.peft_config["default"]
    for layer in layers(model):
        routers = layer.cmoe_routers["default"]
        keep = momentum_coefficients(
            routers.usage[1], routers.usage[0], 0.7, 0.3, config.momentum_usage_threshold
        )
        expected = blend(before[layer.layer_name][0], after[layer.layer_name][0], keep, 2)
        torch.testing.assert_close(layer.cmoe_experts["default"].stacked()[0], expected)
    for name, value in routers_after.items():
        assert torch.equal(dict(model.named_parameters())[name], value), "routers are not merged"
    assert routers_before.keys() == routers_after.keys()


# -- presets -----------------------------------------------------------------------------------


def test_presets_are_plain_configs_with_visible_switches():
    llava = ContinualMoEConfig.llava_cmoe()
    assert llava.expansion and llava.router_per_task and llava.freeze_old_experts and not llava.momentum_merge
    cl = ContinualMoEConfig.cl_moe(top_k=1)
    assert cl.dual_router and cl.momentum_merge and not cl.freeze_old_experts and cl.experts_per_task == 0
    assert (cl.r, cl.lora_alpha, cl.num_experts, cl.top_k, cl.dual_router_beta) == (8, 16, 4, 1, 0.5)
    assert (cl.momentum_shared, cl.momentum_new) == (0.7, 0.3)
    both = ContinualMoEConfig.cl_moe(expansion=True, experts_per_task=1)
    assert both.expansion and both.dual_router
    with pytest.raises(ValueError, match="freeze_old_experts=False"):
        ContinualMoEConfig(momentum_merge=True)
    with pytest.raises(ValueError, match="experts_per_task=0"):
        ContinualMoEConfig(router_per_task=False)
