"""Every supported architecture: default targets, training step, generate, save/reload."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import randomize_experts, tiny_llama
from peft import PeftModel, get_peft_model
from tiny_vlms import ARCHITECTURES, build_tiny_vlm
from torch import nn

from cmoe_adapters import ContinualMoEConfig, ContinualMoELayer


def adapted_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, ContinualMoELayer)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_end_to_end(arch, tmp_path):
    tiny = build_tiny_vlm(arch)
    base_logits = tiny.model(**tiny.batch).logits
    linears_in_decoder = {
        name
        for name, module in tiny.model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(f"{tiny.decoder_path}.layers.")
    }
    model = get_peft_model(tiny.model, ContinualMoEConfig(r=2, num_experts=2, top_k=1))

    # default targets: exactly the language model's linears, never vision tower, projector or lm_head
    targeted = {name.removeprefix("base_model.model.") for name in adapted_names(model)}
    assert targeted == linears_in_decoder

    model.add_task("first")
    model.add_task("second")
    randomize_experts(model)
    model.train()
    out = model(**tiny.batch, labels=tiny.labels(), task="second")
    assert torch.isfinite(out.loss)
    (out.loss + model.router_aux_loss()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.eval()

    logits = {task: model(**tiny.batch, task=task).logits for task in model.tasks}
    assert not torch.allclose(logits["first"], base_logits, atol=1e-4)
    assert not torch.allclose(logits["first"], logits["second"], atol=1e-4)
    generated = model.generate(**tiny.generate_inputs(), task="first", max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] >= 3

    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "cmoe_task-000-first.safetensors",  # the finished task's frozen tensors (shards.py)
    ]
    reloaded = PeftModel.from_pretrained(build_tiny_vlm(arch).model, tmp_path)
    assert reloaded.tasks == ["first", "second"]
    for task, expected in logits.items():
        assert torch.equal(reloaded(**tiny.batch, task=task).logits, expected), task


def test_llama_targets_are_the_decoder_linears():
    model = get_peft_model(tiny_llama(), ContinualMoEConfig())
    names = adapted_names(model)
    assert len(names) == 2 * 7
    assert not any("lm_head" in name for name in names)


def test_explicit_targets_by_list_and_regex():
    by_list = get_peft_model(tiny_llama(), ContinualMoEConfig(target_modules=["q_proj", "v_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in adapted_names(by_list)} == {"q_proj", "v_proj"}
    by_regex = get_peft_model(tiny_llama(), ContinualMoEConfig(target_modules=r".*layers\.1\.mlp\.\w+_proj"))
    assert {n.rsplit(".", 1)[-1] for n in adapted_names(by_regex)} == {"gate_proj", "up_proj", "down_proj"}
    excluded = get_peft_model(tiny_llama(), ContinualMoEConfig(exclude_modules=["down_proj"]))
    assert len(adapted_names(excluded)) == 2 * 6


def test_no_matching_target_names_the_model_type_and_candidates():
    with pytest.raises(ValueError) as error:
        get_peft_model(tiny_llama(), ContinualMoEConfig(target_modules=["query_key_value"]))
    message = str(error.value)
    assert "'llama'" in message and "q_proj" in message and "lm_head" in message


def test_targeting_a_non_linear_module_is_refused():
    with pytest.raises(TypeError, match=re.escape("only torch.nn.Linear")):
        get_peft_model(tiny_llama(), ContinualMoEConfig(target_modules=["q_proj", "input_layernorm"]))


def test_unknown_architecture_without_a_decoder_gets_a_clear_error():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="Cannot find the language model") as error:
        get_peft_model(NotAnLM(), ContinualMoEConfig())
    assert "proj" in str(error.value)
    # with explicit targets any module with linear layers works
    model = get_peft_model(NotAnLM(), ContinualMoEConfig(target_modules=["proj"], num_experts=1, top_k=None))
    model.add_task("only")
    assert model(torch.randn(2, 3, 4)).shape == (2, 3, 4)
