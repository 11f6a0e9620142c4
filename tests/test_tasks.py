"""Tasks: trainability, the old-task guarantee, routing by task name, errors, precisions."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_experts, tiny_llama
from peft import PeftModel, get_peft_model

from cmoe_adapters import ContinualMoEConfig, ContinualMoELayer
from cmoe_adapters._compat import enable_activation_checkpointing


def make_model(**config) -> PeftModel:
    defaults = {"r": 4, "num_experts": 2, "top_k": 1}
    return get_peft_model(tiny_llama(), ContinualMoEConfig(**{**defaults, **config}))


def train_steps(model, input_ids, task=None, steps=3, lr=0.05):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids, task=task).loss
        aux = model.router_aux_loss()
        (loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def cmoe_params(model):
    return {n: p for n, p in model.named_parameters() if "cmoe_" in n}


def test_new_task_freezes_the_past_and_trains_only_its_own_parameters(input_ids):
    model = make_model()
    assert not any(p.requires_grad for p in model.parameters()), "no task yet: nothing to train"
    model.add_task("a")
    model.add_task("b")
    randomize_experts(model)  # B starts at zero, which would leave A's gradient at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "task b must have trainable parameters"
    assert all(
        ".cmoe_routers.default.weight.1" in n or ".lora_A.1" in n or ".lora_B.1" in n for n in trainable
    )
    assert not any("base_layer" in n or "embed" in n or "lm_head" in n for n in trainable)
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids, task="b").loss
    loss.backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_training_a_new_task_leaves_old_task_logits_bit_identical(input_ids):
    model = make_model(num_experts=2, top_k=2, experts_per_task=2)
    model.add_task("a")
    train_steps(model, input_ids, task="a")
    before = model(input_ids=input_ids, task="a").logits.clone()
    snapshot = {n: p.detach().clone() for n, p in cmoe_params(model).items()}

    model.add_task("b")
    train_steps(model, input_ids, task="b", steps=5)
    after = model(input_ids=input_ids, task="a").logits
    assert torch.equal(before, after)
    changed = model(input_ids=input_ids, task="b").logits
    assert not torch.equal(before, changed), "task b must have learnt something of its own"
    # the experts of task a were consolidated into block 0: same values
    for name, value in snapshot.items():
        if ".lora_A.0" in name or ".lora_B.0" in name or ".weight.0" in name:
            assert torch.equal(cmoe_params(model)[name], value), name


def test_routing_needs_a_task_when_several_exist(input_ids):
    model = make_model()
    assert torch.equal(model(input_ids=input_ids).logits, model.get_base_model()(input_ids=input_ids).logits)
    model.add_task("a")
    model(input_ids=input_ids)  # one task: it is used by default
    model.add_task("b")
    with pytest.raises(ValueError, match="2 tasks are registered"):
        model(input_ids=input_ids)
    with pytest.raises(KeyError, match=r"Unknown task 'c'. Known tasks: 'a', 'b'"):
        model(input_ids=input_ids, task="c")
    with pytest.raises(KeyError, match="Known tasks"):
        model.generate(input_ids=input_ids, task="nope", max_new_tokens=2)
    with pytest.raises(ValueError, match="3 samples"):
        model(input_ids=input_ids, task=["a", "b"])
    with pytest.raises(TypeError, match="task name"):
        model(input_ids=input_ids, task=1)


def test_task_names_are_validated(input_ids):
    model = make_model()
    model.add_task("color")
    with pytest.raises(ValueError, match="already exists"):
        model.add_task("color")
    for bad in ["", "has space", "a..b", "-x", "x.lock", "main", "a/b", "x" * 101]:
        with pytest.raises(ValueError, match=r"cannot be used|non-empty"):
            model.add_task(bad)
    assert model.tasks == ["color"]


def test_mixed_batch_routes_each_sample_through_its_task(input_ids):
    model = make_model(num_experts=2, top_k=1, experts_per_task=1)
    for name in ("a", "b", "c"):
        model.add_task(name)
    randomize_experts(model)
    tasks = ["c", "a", "b"]
    mixed = model(input_ids=input_ids, task=tasks).logits
    for i, task in enumerate(tasks):
        alone = model(input_ids=input_ids[i : i + 1], task=task).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(input_ids=input_ids, task="a").logits[0], mixed[0], atol=1e-4)


def test_generate_with_task_uses_that_tasks_routers(input_ids):
    model = make_model()
    model.add_task("a")
    model.add_task("b")
    randomize_experts(model)
    kwargs = {"input_ids": input_ids, "max_new_tokens": 4, "do_sample": False}
    out_a = model.generate(**kwargs, task="a")
    out_b = model.generate(**kwargs, task="b")
    assert out_a.shape == (3, 11)
    # the first generated token must equal the argmax of that task's forward logits
    for out, task in ((out_a, "a"), (out_b, "b")):
        expected = model(input_ids=input_ids, task=task).logits[:, -1].argmax(-1)
        assert torch.equal(out[:, 7], expected)
    mixed = model.generate(**kwargs, task=["a", "b", "a"])
    assert torch.equal(mixed[0], out_a[0]) and torch.equal(mixed[1], out_b[1])


def test_gradient_checkpointing_gives_the_same_gradients(input_ids):
    grads = []
    for checkpointing in (False, True):
        model = make_model(top_k=2, num_experts=2)
        model.add_task("a")
        randomize_experts(model)
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=False)
        model.train()
        out = model(input_ids=input_ids, labels=input_ids, task="a")
        (out.loss + model.router_aux_loss()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_model(input_ids, dtype):
    model = get_peft_model(tiny_llama().to(dtype), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    model.add_task("a")
    experts = next(m for m in model.modules() if isinstance(m, ContinualMoELayer)).cmoe_experts["default"]
    assert experts.lora_A[0].dtype == torch.float32, "adapters train in fp32 on a half-precision base"
    model.train()
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_autocast_bf16_training_step(input_ids):
    model = make_model(top_k=2)
    model.add_task("a")
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_balancing_loss_is_collected_in_training_only(input_ids):
    model = make_model(top_k=1, num_experts=4)
    model.add_task("a")
    model.train()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    model(input_ids=input_ids, attention_mask=attention_mask)
    aux = model.router_aux_loss()
    assert aux is not None and aux.requires_grad and aux.item() >= 0.01 * 1.0 - 1e-6
    model.eval()
    model(input_ids=input_ids)
    assert model.router_aux_loss() is None


def test_dropout_is_active_in_training_only(input_ids):
    model = make_model(lora_dropout=0.5)
    model.add_task("a")
    randomize_experts(model)
    first = model(input_ids=input_ids).logits
    assert torch.equal(first, model(input_ids=input_ids).logits)
    model.train()
    assert not torch.equal(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_disable_adapter_and_unload_give_the_base_model(input_ids):
    model = make_model()
    model.add_task("a")
    randomize_experts(model)
    base_logits = tiny_llama()(input_ids=input_ids).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=input_ids).logits, base_logits)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert not any(isinstance(m, ContinualMoELayer) for m in base.modules())
    torch.testing.assert_close(base(input_ids=input_ids).logits, base_logits)
    assert base.generate(input_ids=input_ids, max_new_tokens=2).shape == (3, 9)


def test_inference_model_refuses_new_tasks(tmp_path, input_ids):
    model = make_model()
    model.add_task("a")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="is_trainable=True"):
        loaded.add_task("b")
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    trainable.add_task("b")
    assert trainable.tasks == ["a", "b"]
