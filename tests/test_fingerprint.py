"""The base model's fingerprint: recorded when an adapter is created, checked when it is loaded.

Another seed of the same tiny Llama has the same architecture and shapes and other weights: the
case where peft loads without a word and every expert and locator is meaningless.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers
from conftest import tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_shards import build, config_for

from cmoe_adapters import fingerprint, shards
from cmoe_adapters.fingerprint import BaseModelMismatchError, BaseModelMismatchWarning

CONFIG = "adapter_config.json"
TINY = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter with two learnt tasks, saved from a model on ``tiny_llama(seed=0)``."""
    folder = tmp_path_factory.mktemp("adapter")
    build(2).save_pretrained(folder)
    return folder


def fingerprint_on(base: torch.nn.Module) -> dict:
    """The fingerprint a new adapter records on `base`."""
    return get_peft_model(base, config_for()).peft_config["default"].base_model_fingerprint


def load_without_warnings(base, path, **kwargs) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return PeftModel.from_pretrained(base, path, **kwargs)


def test_the_fingerprint_is_recorded_at_creation_and_saved(saved):
    model = get_peft_model(tiny_llama(), config_for())
    recorded = model.peft_config["default"].base_model_fingerprint
    assert recorded["model_type"] == "llama" and recorded["model_class"] == "LlamaForCausalLM"
    assert recorded["layers"]["model.layers.*.mlp.up_proj"] == "2 x 64x32"
    assert list(recorded["weights"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert json.loads((saved / CONFIG).read_text())["base_model_fingerprint"] == recorded
    assert fingerprint.compute(model.base_model.model) == recorded  # a function of the base alone


def test_the_same_base_loads_silently(saved):
    assert load_without_warnings(tiny_llama(), saved).tasks == ["low", "mid"]


def test_other_weights_of_the_same_shapes_warn_and_strict_loading_refuses(saved, monkeypatch):
    with pytest.warns(BaseModelMismatchWarning) as record:
        model = PeftModel.from_pretrained(tiny_llama(seed=1), saved)
    message = str(record[0].message)
    assert "model.layers.0.self_attn.q_proj.weight (other values, both float32)" in message
    assert "quantized, merged or re-cast" in message and "strict_base_check=True" in message
    assert model.tasks == ["low", "mid"]  # a warning: it still loads

    with pytest.raises(BaseModelMismatchError, match="other weights"):
        PeftModel.from_pretrained(tiny_llama(seed=1), saved, strict_base_check=True)
    monkeypatch.setenv(fingerprint.STRICT_ENVIRONMENT, "1")
    with pytest.raises(BaseModelMismatchError, match="Strict base checking is on"):
        PeftModel.from_pretrained(tiny_llama(seed=1), saved)
    with pytest.warns(BaseModelMismatchWarning):  # explicitly not strict: loads, with the warning
        loose = PeftModel.from_pretrained(tiny_llama(seed=1), saved, strict_base_check=False)
    with pytest.raises(BaseModelMismatchError):  # load_adapter: peft passes no loading option on
        loose.load_adapter(saved, adapter_name="again")
    with pytest.warns(BaseModelMismatchWarning):  # an explicit choice beats the environment
        PeftModel.from_pretrained(tiny_llama(seed=1), saved, strict_base_check=False)


def test_a_copy_in_another_dtype_is_named_as_such():
    base = tiny_llama()
    model = get_peft_model(base, config_for())
    saved = model.peft_config["default"].base_model_fingerprint
    cast = fingerprint.compute(model.base_model.model.to(torch.bfloat16))
    with pytest.warns(BaseModelMismatchWarning, match=r"float32 when saved, bfloat16 here"):
        fingerprint.check(saved, cast)


def test_another_architecture_is_an_error(saved):
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY)).eval()
    with pytest.raises(
        BaseModelMismatchError, match=r"created on a 'llama' model.*here is a 'mistral' model"
    ):
        PeftModel.from_pretrained(mistral, saved)


def test_other_shapes_are_an_error_that_names_the_layers(saved):
    torch.manual_seed(0)
    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**TINY, "intermediate_size": 48})
    ).eval()
    with pytest.raises(BaseModelMismatchError) as caught:
        PeftModel.from_pretrained(wider, saved)
    assert "model.layers.*.mlp.up_proj: 2 x 64x32 when saved, 2 x 48x32 here" in str(caught.value)


def test_adapters_saved_before_fingerprints_load_silently_on_any_base(saved, tmp_path):
    """No fingerprint in the config nor in the manifest's copy of it: nothing to compare with."""
    shutil.copytree(saved, tmp_path / "old")
    config = json.loads((tmp_path / "old" / CONFIG).read_text())
    del config["base_model_fingerprint"]
    (tmp_path / "old" / CONFIG).write_text(json.dumps(config))
    main = tmp_path / "old" / "adapter_model.safetensors"
    tensors = load_file(main)
    manifest = shards.read_manifest(str(main))
    old = json.dumps({"layout": manifest["layout"], "shards": manifest["shards"]}).encode()
    tensors[shards.MANIFEST_KEY] = torch.tensor(list(old), dtype=torch.uint8)
    save_file(tensors, str(main), metadata={"format": "pt"})

    model = load_without_warnings(tiny_llama(seed=1), tmp_path / "old")
    # from now on it carries the fingerprint of the base it was loaded on
    assert model.peft_config["default"].base_model_fingerprint == fingerprint_on(tiny_llama(seed=1))


def test_an_adapter_without_tasks_takes_the_new_base(tmp_path):
    get_peft_model(tiny_llama(), config_for()).save_pretrained(tmp_path)
    model = load_without_warnings(tiny_llama(seed=1), tmp_path)
    assert model.peft_config["default"].base_model_fingerprint == fingerprint_on(tiny_llama(seed=1))


def test_partitioned_base_weights_are_not_digested(saved):
    """Under ZeRO-3 each process holds a slice of every weight: shapes are compared, bytes are not."""
    base = tiny_llama(seed=1)
    for name, parameter in base.named_parameters():
        if name.endswith("proj.weight"):
            parameter.ds_id, parameter.ds_shape = 0, parameter.shape  # what deepspeed.zero.Init sets
    assert load_without_warnings(base, saved).tasks == ["low", "mid"]
