"""Per-task shard files: exact round trips, frozen shards whose bytes never change, the old layout."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from conftest import tiny_llama
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cmoe_adapters import ContinualMoEConfig, momentum, shards

VOCAB = {"low": (3, 30), "mid": (33, 60), "high": (63, 90)}
BASE = {"r": 4, "num_experts": 2, "top_k": 1, "locator_steps": 20, "locator_hidden_dim": 16}
MODES = {
    "frozen_experts": {},
    "unfrozen_experts": {"freeze_old_experts": False, "experts_per_task": 1},
    "cl_moe_momentum_merge": {"preset": "cl_moe"},
    "shared_router": {"router_per_task": False, "experts_per_task": 0},
    "learned_task_gate": {"dual_router": True, "task_gate": "learned", "experts_per_task": 1},
}


def prompts(task: str, count: int, seed: int) -> torch.Tensor:
    low, high = VOCAB[task]
    return torch.randint(low, high, (count, 6), generator=torch.Generator().manual_seed(seed))


def probe_ids() -> torch.Tensor:
    return torch.cat([prompts(task, 2, 900 + i) for i, task in enumerate(VOCAB)])


def config_for(mode: str = "frozen_experts") -> ContinualMoEConfig:
    settings = dict(MODES[mode])
    if settings.pop("preset", None) == "cl_moe":
        return ContinualMoEConfig.cl_moe(**BASE)
    return ContinualMoEConfig(**BASE, **settings)


def grow(model: PeftModel, task: str) -> None:
    """Add `task`, change what it may train (stands for training), merge if configured, fit its locator."""
    index = len(model.tasks)
    model.add_task(task)
    config = model.peft_config[model.active_adapter]
    before = momentum.snapshot_old_experts(model.base_model) if config.momentum_merge else None
    generator = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    if config.dual_router or config.momentum_merge:
        with model.tracking_usage():
            model(input_ids=prompts(task, 8, index), task=task)
        model.record_usage(task)
    if before:
        momentum.merge_newest_task(model.base_model, before)
    model.fit_locator(task, features=model.locator_features(input_ids=prompts(task, 32, 10 + index)))
    model.freeze()


def build(tasks: int, mode: str = "frozen_experts", adapter_name: str = "default") -> PeftModel:
    model = get_peft_model(tiny_llama(), config_for(mode), adapter_name=adapter_name)
    for task in list(VOCAB)[:tasks]:
        grow(model, task)
    return model.eval()


def state(model: PeftModel, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    name = adapter_name or model.active_adapter
    return get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)


def assert_same_state(loaded: PeftModel, original: PeftModel) -> None:
    """Same tasks, bit-identical tensors, logits per task and locator probabilities."""
    assert loaded.tasks == original.tasks
    expected, actual = state(original), state(loaded)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    ids = probe_ids()
    for task in original.tasks:
        assert torch.equal(loaded(input_ids=ids, task=task).logits, original(input_ids=ids, task=task).logits)
    if len(original.tasks) > 1:
        probabilities = original.task_probabilities(input_ids=ids)
        assert torch.equal(loaded.task_probabilities(input_ids=ids), probabilities)


def stacked_experts(model: PeftModel) -> dict[str, torch.Tensor]:
    """Every layer's expert rows (A and B), all blocks stacked."""
    layers = model.base_model._layers()
    experts = [(layer.layer_name, layer.cmoe_experts[model.active_adapter]) for layer in layers]
    return {name: torch.cat(e.stacked(), dim=1).detach().clone() for name, e in experts}


def shard_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("cmoe_task-"))


def read(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def test_three_tasks_round_trip_exactly_from_main_file_and_shards(tmp_path):
    model = build(3)
    model.save_pretrained(tmp_path)
    assert shard_files(tmp_path) == ["cmoe_task-000-low.safetensors", "cmoe_task-001-mid.safetensors"]
    main = load_file(tmp_path / "adapter_model.safetensors")
    assert shards.MANIFEST_KEY in main
    finished = re.compile(r"(\.(weight|usage|task_logits|by_task)\.[01]$)|(vaes\.[01]\.)")
    assert not [key for key in main if finished.search(key)], "finished tasks live in their shards"
    assert any(key.endswith("cmoe_routers.weight.2") for key in main)
    assert any(key.endswith("lora_A.by_task.2") for key in main)
    assert sum(t.numel() for t in main.values()) < sum(t.numel() for t in state(model).values()) / 2

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_same_state(loaded, model)
    # a loaded adapter saves the same bytes (a resumed stream re-uploads nothing), and where it was
    # loaded from is not written anywhere
    loaded.save_pretrained(tmp_path / "again")
    for name in [*shard_files(tmp_path), "adapter_model.safetensors"]:
        assert read(tmp_path / name) == read(tmp_path / "again" / name), name
    assert "_cmoe" not in (tmp_path / "again" / "adapter_config.json").read_text()

    # load_adapter under a new name: the same state, nothing missing or unexpected
    other = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    result = other.load_adapter(tmp_path, adapter_name="again")
    assert not result.missing_keys and not result.unexpected_keys
    other.set_adapter("again")
    assert_same_state(other, model)


def test_finished_tasks_shards_keep_their_bytes_from_save_to_save(tmp_path):
    model = build(2)
    model.save_pretrained(tmp_path / "two")
    model.save_pretrained(tmp_path / "two_again")
    for name in os.listdir(tmp_path / "two"):  # saving is deterministic, file by file
        if name.endswith(".safetensors"):
            assert read(tmp_path / "two" / name) == read(tmp_path / "two_again" / name), name

    grow(model, "high")
    model.save_pretrained(tmp_path / "three")
    assert shard_files(tmp_path / "two") == ["cmoe_task-000-low.safetensors"]
    low = "cmoe_task-000-low.safetensors"
    assert read(tmp_path / "two" / low) == read(tmp_path / "three" / low)
    # the task that just became old moves from the main file to its shard, unchanged
    mid = load_file(tmp_path / "three" / "cmoe_task-001-mid.safetensors")
    main_before = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for key, value in mid.items():
        assert torch.equal(value, main_before[key]), key
    assert_same_state(PeftModel.from_pretrained(tiny_llama(), tmp_path / "three"), model)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_round_trips_and_only_frozen_tensors_go_to_shards(tmp_path, mode):
    model = build(2, mode)
    model.save_pretrained(tmp_path / "two")
    experts_before = stacked_experts(model)
    grow(model, "high")
    model.save_pretrained(tmp_path / "three")

    config = model.peft_config["default"]
    experts_after = stacked_experts(model)
    old_experts_changed = any(
        not torch.equal(rows, experts_after[layer][: rows.shape[0]]) for layer, rows in experts_before.items()
    )
    assert old_experts_changed == (not config.freeze_old_experts)
    for name in shard_files(tmp_path / "three"):
        keys = load_file(tmp_path / "three" / name).keys()
        if not config.freeze_old_experts:
            assert not [key for key in keys if "cmoe_experts" in key], name
        if not config.router_per_task:
            assert not [key for key in keys if ".cmoe_routers.weight." in key], name
    low = "cmoe_task-000-low.safetensors"
    assert read(tmp_path / "two" / low) == read(tmp_path / "three" / low)

    assert_same_state(PeftModel.from_pretrained(tiny_llama(), tmp_path / "three"), model)
    two = PeftModel.from_pretrained(tiny_llama(), tmp_path / "two")
    assert two.tasks == ["low", "mid"]


def test_single_file_adapters_still_load(tmp_path):
    """The layout of earlier versions: every tensor in adapter_model.safetensors."""
    model = build(3)
    save_file(state(model), str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(tmp_path)  # not from PeftModel: does not split
    assert shard_files(tmp_path) == []
    assert_same_state(PeftModel.from_pretrained(tiny_llama(), tmp_path), model)


def test_pickle_saves_keep_one_file(tmp_path):
    model = build(2)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    with pytest.warns(UserWarning, match=r"adapter_model.bin is a pickle save .* cannot be found"):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # not checked, and it says so
    assert_same_state(loaded, model)


def test_a_named_adapter_in_a_subfolder(tmp_path):
    model = build(2, adapter_name="named")
    model.save_pretrained(tmp_path)
    assert shard_files(tmp_path / "named") == ["cmoe_task-000-low.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="named", adapter_name="named")
    assert_same_state(loaded, model)


def test_loading_into_an_existing_adapter(tmp_path):
    model = build(3)
    model.save_pretrained(tmp_path / "saved")
    # a later save of the same stream (e.g. a Trainer checkpoint while the newest task trains)
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved", is_trainable=True)
    with torch.no_grad():
        for parameter in trainable.parameters():
            if parameter.requires_grad:
                parameter.mul_(1.5)
    trainable.save_pretrained(tmp_path / "checkpoint")

    # the model already holds the finished tasks' tensors: no shard file is needed
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved", is_trainable=True)
    for name in shard_files(tmp_path / "saved"):
        os.remove(tmp_path / "saved" / name)
    resumed.load_adapter(tmp_path / "checkpoint", adapter_name="default", is_trainable=True)
    assert_same_state(resumed, trainable)

    # a fresh model grown to the saved structure must be told where the shards are
    fresh = get_peft_model(tiny_llama(), config_for())
    fresh.base_model.replay_tasks(PeftConfig.from_pretrained(tmp_path / "checkpoint"))
    with pytest.raises(ValueError, match=r"(?s)cmoe_task-000-low\.safetensors.*remember_source"):
        fresh.load_adapter(tmp_path / "checkpoint", adapter_name="default")
    shards.remember_source(fresh.peft_config["default"], tmp_path / "checkpoint")
    fresh.load_adapter(tmp_path / "checkpoint", adapter_name="default")
    assert_same_state(fresh.eval(), trainable)


def test_a_shard_that_does_not_match_the_manifest_is_refused(tmp_path):
    model = build(3)
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "cmoe_task-001-mid.safetensors")
    tensors = load_file(path)
    key = next(key for key in tensors if key.endswith("cmoe_routers.weight.1"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?s)'mid'.*holds other tensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_saving_fewer_tasks_into_the_same_folder_removes_old_shards(tmp_path):
    build(3).save_pretrained(tmp_path)
    one = build(1)
    one.save_pretrained(tmp_path)
    assert shard_files(tmp_path) == []
    # a one-task save is one file; its manifest (digests of the file itself) lists no shard
    assert shards.read_manifest(str(tmp_path / "adapter_model.safetensors"))["shards"] == []
    assert_same_state(PeftModel.from_pretrained(tiny_llama(), tmp_path), one)


def test_copied_folders_load_anywhere(tmp_path):
    model = build(2)
    model.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    assert_same_state(PeftModel.from_pretrained(tiny_llama(), tmp_path / "b"), model)
