"""ContinualMoEConfig: defaults, validation messages, JSON round trip through peft."""

from __future__ import annotations

import json

import pytest
from peft import PeftConfig

from cmoe_adapters import CONTINUAL_MOE, ContinualMoEConfig
from cmoe_adapters.config import validate_task_name


def test_defaults_are_sane():
    config = ContinualMoEConfig()
    assert (config.r, config.lora_alpha, config.num_experts, config.top_k) == (8, 16, 4, 2)
    assert config.experts_per_task == config.num_experts
    assert config.peft_type == CONTINUAL_MOE and config.task_records == []
    assert config.target_modules is None, "None means: the architecture's language-model linears"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r=0"),
        ({"r": 2.5}, "r=2.5"),
        ({"lora_alpha": 0}, "lora_alpha=0"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"num_experts": 2, "top_k": 3}, "top_k=3 exceeds num_experts=2: lower top_k"),
        ({"top_k": 0}, "top_k=0"),
        ({"experts_per_task": -1}, "experts_per_task=-1"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef=-0.1"),
        ({"target_modules": []}, "adapts nothing"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
        ({"target_modules": [1, 2]}, "list of module names"),
        ({"task_records": [{"name": "a"}, {"name": "a"}]}, "appears twice"),
        ({"task_records": [{"name": "bad name"}]}, "cannot be used"),
    ],
)
def test_invalid_configs_fail_at_construction_saying_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match="Invalid ContinualMoEConfig") as error:
        ContinualMoEConfig(**kwargs)
    assert message in str(error.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as error:
        ContinualMoEConfig(r=0, num_experts=0)
    assert "r=0" in str(error.value) and "num_experts=0" in str(error.value)


def test_dense_and_routing_only_later_tasks_are_valid():
    assert ContinualMoEConfig(top_k=None, num_experts=1).top_k is None
    assert ContinualMoEConfig(experts_per_task=0).experts_per_task == 0


def test_round_trip_through_adapter_config_json(tmp_path):
    config = ContinualMoEConfig(r=4, num_experts=3, top_k=None, target_modules=["q_proj", "v_proj"])
    config.task_records = [{"name": "color"}, {"name": "shape", "expanded_layers": ["x.q_proj"]}]
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CONTINUAL_MOE"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ContinualMoEConfig)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.task_names == ["color", "shape"]
    assert loaded.new_experts_for(0, "x.q_proj") == 3
    assert loaded.new_experts_for(1, "x.q_proj") == 3 and loaded.new_experts_for(1, "x.v_proj") == 0


@pytest.mark.parametrize("name", ["color", "vqa_v2", "ocr-vqa", "Task.1", "_x"])
def test_good_task_names(name):
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    "name", [None, "", "a b", "a/b", "a..b", "a.", "-a", ".a", "x.lock", "HEAD", "a~1", "é"]
)
def test_bad_task_names(name):
    with pytest.raises(ValueError):
        validate_task_name(name)


def test_one_preset_table_serves_every_entry_point():
    from cmoe_adapters.config import PRESETS

    assert PRESETS == ("default", "llava_cmoe", "cl_moe")
    assert ContinualMoEConfig.from_preset("default", r=2).to_dict() == ContinualMoEConfig(r=2).to_dict()
    assert ContinualMoEConfig.from_preset(None).to_dict() == ContinualMoEConfig().to_dict()
    for preset in PRESETS[1:]:
        expected = getattr(ContinualMoEConfig, preset)(top_k=1).to_dict()
        assert ContinualMoEConfig.from_preset(preset, top_k=1).to_dict() == expected
    with pytest.raises(ValueError, match="Unknown preset 'lora'; choose one of default, llava_cmoe, cl_moe"):
        ContinualMoEConfig.from_preset("lora")
