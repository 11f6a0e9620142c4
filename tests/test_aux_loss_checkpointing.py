"""The routers' balancing loss counts once per layer per forward, with or without activation checkpointing.

Reentrant checkpointing runs a layer's first forward without autograd (so the loss cannot join the
task loss there); its recompute inside backward adds the loss's gradient instead. Non-reentrant
checkpointing recomputes with autograd on, and must not count the loss a second time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_experts, tiny_llama
from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters._compat import enable_activation_checkpointing

IDS = torch.randint(3, 90, (4, 10), generator=torch.Generator().manual_seed(0))


def router_gradients(checkpointing: str | None, coef: float = 0.5, scale: float = 1.0):
    model = get_peft_model(
        tiny_llama(), ContinualMoEConfig(r=4, num_experts=4, top_k=2, router_aux_loss_coef=coef)
    )
    model.add_task("a")
    randomize_experts(model)
    if checkpointing is not None:
        enable_activation_checkpointing(model, use_reentrant=checkpointing == "reentrant")
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model.train()
    model.set_aux_loss_gradient_scale(scale)
    loss = model(input_ids=IDS, labels=IDS).loss / (1 / scale)
    aux = model.router_aux_loss()
    value = model.router_aux_loss_value()  # what the trainer logs
    logged = None if value is None else float(value)
    assert (aux is None) == (checkpointing == "reentrant") or coef == 0
    if aux is not None:
        loss = loss + aux * scale
    loss.backward()
    routing = model.base_model._routing
    assert len(routing.aux_losses) == 14, "one entry per adapted layer (2 layers x 7 linears), never two"
    grads = {
        n: p.grad.clone() for n, p in model.named_parameters() if "cmoe_routers" in n and p.grad is not None
    }
    return grads, logged


@pytest.fixture(scope="module")
def reference():
    return router_gradients(None)


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_checkpointed_router_gradients_equal_the_plain_ones(checkpointing, reference):
    expected, logged = reference
    grads, checkpointed_log = router_gradients(checkpointing)
    assert grads.keys() == expected.keys() and len(grads) == 14
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # the same value is logged: under reentrant checkpointing from the first pass (no autograd there;
    # router_aux_loss() is None and the loss's gradient joins inside backward instead)
    assert checkpointed_log == pytest.approx(logged, rel=1e-6)


def test_the_balancing_loss_changes_the_router_gradients(reference):
    expected, logged = reference
    assert logged is not None and logged > 0
    without, _ = router_gradients(None, coef=0.0)
    assert any(not torch.allclose(without[name], expected[name]) for name in expected)
    deferred, _ = router_gradients("reentrant", coef=0.0)
    for name, grad in deferred.items():  # coef 0: reentrant adds nothing either
        torch.testing.assert_close(grad, without[name], rtol=1e-5, atol=1e-7)


def test_deferred_gradient_follows_the_callers_loss_scale():
    """Gradient accumulation divides the loss; the part added inside backward is divided likewise."""
    plain, _ = router_gradients(None, scale=0.25)
    deferred, _ = router_gradients("reentrant", scale=0.25)
    for name, grad in deferred.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)
