"""The seams between this library and the installed transformers / peft, checked where they move.

Each protected hook the library overrides or calls is listed here with the parameters it relies
on, so a release that renames or reshapes one fails this file with its name (instead of a
traceback deep inside a training run); the renamed public names go through `cmoe_adapters._compat`,
tested here on whatever transformers is installed. The last test runs the library's everyday calls
with deprecation warnings made visible: a deprecation caused by this library's own use fails it.
"""

from __future__ import annotations

import inspect
import warnings

import peft
import pytest
import torch
import transformers
from conftest import tiny_llama
from peft import PeftModel, get_peft_model, mapping
from peft.config import PeftConfigMixin
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from tiny_vlms import build_tiny_vlm
from transformers import DynamicCache, Trainer, TrainingArguments

from cmoe_adapters import ContinualMoEConfig, ContinualMoELayer, ContinualMoEModel, ContinualMoETrainer
from cmoe_adapters._compat import (
    activation_checkpointing,
    checkpointing_argument,
    enable_activation_checkpointing,
    with_checkpointing_kwargs,
    without_cache,
)

# (class, protected member, the parameters the library passes or receives by name)
PROTECTED_HOOKS = [
    (BaseTuner, "_pre_injection_hook", ["model", "config", "adapter_name"]),
    (BaseTuner, "_prepare_adapter_config", ["peft_config", "model_config"]),
    (
        BaseTuner,
        "_create_and_replace",
        ["peft_config", "adapter_name", "target", "target_name", "parent", "current_key"],
    ),
    (BaseTuner, "_remap_adapter_state_dict_for_load", ["model", "config", "adapter_name", "state_dict"]),
    (BaseTuner, "_remove_adapter_name_from_key", ["key", "adapter_name"]),
    (BaseTuner, "_check_merge_allowed", []),
    (BaseTuner, "_unload_and_optionally_merge", []),
    (BaseTuner, "_replace_module", ["parent", "child_name", "new_module", "child"]),
    (BaseTuner, "inject_adapter", ["model", "adapter_name"]),
    (BaseTunerLayer, "_cast_input_dtype", ["x", "dtype"]),
    (Trainer, "_prepare_inputs", ["inputs"]),
    # peft functions `integrity.install_peft_guards` wraps (peft reads and writes files before us)
    (PeftConfigMixin, "from_json_file", ["path_json_file"]),
    (PeftConfigMixin, "_get_peft_type", ["model_id"]),
    (PeftModel, "save_pretrained", ["save_directory"]),
]


@pytest.mark.parametrize(
    ("owner", "name", "parameters"), PROTECTED_HOOKS, ids=lambda v: getattr(v, "__name__", v)
)
def test_protected_hooks_the_library_relies_on_are_still_there(owner, name, parameters):
    member = getattr(owner, name, None)
    assert callable(member), (
        f"{owner.__module__}.{owner.__name__}.{name} is gone in this release "
        f"(peft {peft.__version__}, transformers {transformers.__version__}): "
        "cmoe_adapters overrides or calls it; port the library to what replaced it."
    )
    found = list(inspect.signature(member).parameters)
    missing = [p for p in parameters if p not in found]
    assert not missing, f"{owner.__name__}.{name} lost parameters {missing}; it now takes {found}."


def test_the_library_still_overrides_exactly_those_hooks():
    """A new override of a protected hook must be listed above (and so be checked on every release)."""
    listed = {(owner, name) for owner, name, _ in PROTECTED_HOOKS}
    ours = [
        (ContinualMoEModel, BaseTuner),
        (ContinualMoELayer, BaseTunerLayer),
        (ContinualMoETrainer, Trainer),
    ]
    for cls, base in ours:
        for name in vars(cls):
            if (
                name.startswith("_")
                and not name.startswith("__")
                and name != "_abc_impl"
                and hasattr(base, name)
            ):
                assert (base, name) in listed, (
                    f"{cls.__name__} overrides {base.__name__}.{name}: list it here"
                )


def test_base_tuner_layer_state_the_layer_sets_is_what_peft_reads():
    layer = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1)).base_model
    layer = next(m for m in layer.modules() if isinstance(m, ContinualMoELayer))
    assert layer.active_adapters == ["default"], "peft reads BaseTunerLayer._active_adapter"
    assert layer.disable_adapters is False, "peft reads BaseTunerLayer._disable_adapters"


def test_trainer_state_the_loss_scaling_reads_exists(tmp_path):
    from cmoe_adapters._compat import loss_is_scaled_for_ga

    trainer = Trainer(model=tiny_llama(), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    for name in ("model_accepts_loss_kwargs", "compute_loss_func"):
        assert hasattr(trainer, name), f"Trainer.{name} moved: see _compat.loss_is_scaled_for_ga"
    assert loss_is_scaled_for_ga(trainer, None) is False
    assert loss_is_scaled_for_ga(trainer, 12) is bool(trainer.model_accepts_loss_kwargs)


def test_a_new_batch_size_reaches_the_next_training_dataloader(tmp_path):
    """The private seam of per-task batch sizes (`_compat.set_train_batch_size`)."""
    from cmoe_adapters._compat import set_train_batch_size

    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8)
    data = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 12
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=data)
    args.per_device_train_batch_size = 3
    set_train_batch_size(trainer)
    assert trainer.get_train_dataloader().total_batch_size == 3, "see _compat.set_train_batch_size"


def test_peft_registration_tables_exist():
    for table in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
        assert isinstance(getattr(mapping, table, None), dict), f"peft.mapping.{table} moved"
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["CONTINUAL_MOE"] is ContinualMoEConfig


def test_an_excluded_module_is_not_a_match():
    """The tuner keeps a module when `check_target_module_exists` answers truthy; excluded ones are falsy."""
    config = ContinualMoEConfig(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    assert check_target_module_exists(config, "model.layers.1.self_attn.q_proj")
    assert not check_target_module_exists(config, "model.layers.0.self_attn.q_proj")


def test_checkpointing_argument_round_trips_through_training_arguments(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], **checkpointing_argument(True)
    )
    assert activation_checkpointing(args) == (True, {})
    changed = with_checkpointing_kwargs(args, {"use_reentrant": True})
    assert activation_checkpointing(changed) == (True, {"use_reentrant": True})
    assert activation_checkpointing(args) == (True, {}), "the original is untouched"
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert activation_checkpointing(plain) == (False, {})


def test_enable_activation_checkpointing_checkpoints_the_decoder_layers():
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated alias on this transformers
        enable_activation_checkpointing(model, use_reentrant=False)
    layer = model.model.layers[0]
    assert getattr(layer, "gradient_checkpointing", False) or getattr(
        layer, "activation_checkpointing", False
    )


def test_without_cache_drops_the_kv_cache_under_any_keyword():
    cache = DynamicCache()
    kwargs = {"input_ids": torch.ones(1, 2), "past_key_values": cache, "cache": cache, "renamed": cache}
    assert list(without_cache(kwargs)) == ["input_ids"]


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    known = ("is_gradient_checkpointing",)  # peft asks transformers' deprecated property itself
    return [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, DeprecationWarning | FutureWarning)
        and "deprecat" in str(w.message).lower()
        and not any(k in str(w.message) for k in known)
    ]


def test_everyday_calls_raise_no_deprecation_from_transformers_or_peft():
    """Forward, training step, locating and (located) generate on a tiny LLaVA, every warning shown."""
    vlm = build_tiny_vlm("llava")
    model = get_peft_model(vlm.model, ContinualMoEConfig(r=4, num_experts=2, top_k=1, locator_steps=5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for task in ("a", "b"):
            model.add_task(task)
            model.train()
            with model.using_task(task), model.collecting_locator_features():
                for _ in range(2):  # the locator needs at least 4 samples
                    out = model(**vlm.batch, labels=vlm.labels())
                    (out.loss + model.router_aux_loss()).backward()
            model.fit_locator(task)
        model.eval()
        model.locate_tasks(**vlm.batch)
        model.generate(**vlm.batch, max_new_tokens=2, do_sample=False)
        model.generate(**vlm.batch, max_new_tokens=2, do_sample=False, task="a")
    assert not _deprecations(caught), "\n".join(_deprecations(caught))
