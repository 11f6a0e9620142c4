"""No damaged, truncated or missing file loads silently, and a failed save leaves the previous one intact.

A 3-task stream is saved the way `ContinualMoETrainer` saves it (``out/low``, ``out/mid``,
``out/high``); each test damages a copy of a save and checks the one clear error, which names the
file, says what is wrong and how to recover. Saves are failed at each of their writes.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import peft.peft_model
import pytest
import torch
from conftest import tiny_llama
from huggingface_hub import HfApi
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_shards import build, grow, state

from cmoe_adapters import integrity, shards
from cmoe_adapters.integrity import AdapterFileError, AdapterSaveError

if TYPE_CHECKING:
    from hub_server import FakeHub

pytest_plugins = ["hub_server"]

MAIN = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
LOW, MID = "cmoe_task-000-low.safetensors", "cmoe_task-001-mid.safetensors"


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> Path:
    """``out/<task>`` after each task of a 3-task stream (read-only: tests damage copies)."""
    out = tmp_path_factory.mktemp("stream") / "out"
    model = build(1)
    model.save_pretrained(out / "low")
    grow(model, "mid")
    model.save_pretrained(out / "mid")
    grow(model, "high")
    model.eval().save_pretrained(out / "high")
    return out


@pytest.fixture
def out(saves, tmp_path) -> Path:
    """A private copy of the three saves."""
    shutil.copytree(saves, tmp_path / "out")
    return tmp_path / "out"


def header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return size, json.loads(data[8 : 8 + size])


def flip_data(path: Path, key_part: str) -> str:
    """Flip 16 bytes in the data of the first tensor whose name contains `key_part`; returns its name."""
    size, tensors = header(path)
    key = next(key for key in sorted(tensors) if key_part in key)
    start = 8 + size + tensors[key]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[start : start + 16] = bytes(byte ^ 0xFF for byte in data[start : start + 16])
    path.write_bytes(bytes(data))
    return key


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[12] = 0xFF  # inside the JSON header: not UTF-8 any more
    path.write_bytes(bytes(data))


def rename_in_header(path: Path) -> None:
    """A valid header that names another tensor (same length, so every offset still fits)."""
    data = path.read_bytes()
    assert b"lora_A.by_task.2" in data
    path.write_bytes(data.replace(b"lora_A.by_task.2", b"lora_A.by_task.7", 1))


def load(path: Path, **kwargs) -> PeftModel:
    return PeftModel.from_pretrained(tiny_llama(), path, **kwargs)


def same_state(left: PeftModel, right: PeftModel) -> bool:
    a, b = state(left), state(right)
    return left.tasks == right.tasks and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# -- every kind of damage gets one clear error ---------------------------------------------------------


def test_intact_saves_load_without_a_warning(saves):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for task, tasks in (("low", ["low"]), ("mid", ["low", "mid"]), ("high", ["low", "mid", "high"])):
            assert load(saves / task).tasks == tasks
            assert shards.verify_adapter(saves / task).task_names == tasks


DAMAGES = {
    "flipped bytes in an expert tensor": (
        MAIN,
        lambda p: flip_data(p, "lora_A.by_task.2"),
        "bytes of its tensors",
    ),
    "flipped bytes in the manifest": (MAIN, lambda p: flip_data(p, shards.MANIFEST_KEY), "manifest"),
    "truncated main file": (MAIN, truncate, "truncated"),
    "damaged main header": (MAIN, damage_header, "header is corrupt"),
    "renamed tensor in the main header": (MAIN, rename_in_header, "names or shapes"),
    "flipped bytes in a shard": (MID, lambda p: flip_data(p, "lora_A"), "holds other tensors"),
    "truncated shard": (LOW, truncate, "truncated"),
    "damaged shard header": (LOW, damage_header, "header is corrupt"),
    "truncated config": (CONFIG, truncate, "not valid JSON"),
    "damaged config": (
        CONFIG,
        lambda p: p.write_bytes(p.read_bytes().replace(b'"r":', b'"r";')),
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_file_raises_one_error_naming_it_and_the_previous_save(out, damage):
    filename, spoil, problem = DAMAGES[damage]
    spoil(out / "high" / filename)
    for check in (lambda: load(out / "high"), lambda: shards.verify_adapter(out / "high")):
        with pytest.raises(AdapterFileError) as caught:
            check()
        message = str(caught.value)
        assert str(out / "high" / filename) in message and problem in message, message
        assert "To recover" in message and str(out / "mid") in message, message
    assert load(out / "mid").tasks == ["low", "mid"]  # the recovery it names works


def test_reading_a_damaged_config_alone_names_it(out):
    """`PeftConfig.from_pretrained` (the trainer resuming, the command line) reads only the config."""
    truncate(out / "high" / CONFIG)
    with pytest.raises(AdapterFileError, match=rf"{out / 'high' / CONFIG} is damaged: it is not valid JSON"):
        PeftConfig.from_pretrained(out / "high")


@pytest.mark.parametrize("filename", [MAIN, MID, CONFIG])
def test_a_missing_file_raises_one_error_naming_it(out, filename):
    os.remove(out / "high" / filename)
    with pytest.raises(AdapterFileError, match="is missing") as caught:
        load(out / "high")
    assert str(out / "high" / filename) in str(caught.value) and str(out / "mid") in str(caught.value)


def test_a_damaged_shard_names_an_intact_copy_of_it(out):
    """A finished task's shard is the same file in every later save: the error says where to copy it from."""
    truncate(out / "high" / LOW)
    with pytest.raises(AdapterFileError, match=rf"copy {LOW} from {out / 'mid'}"):
        load(out / "high")
    shutil.copy(out / "mid" / LOW, out / "high" / LOW)
    assert load(out / "high").tasks == ["low", "mid", "high"]


def test_damage_found_when_loading_into_an_existing_adapter(out):
    """``load_adapter`` into an adapter that exists (a Trainer resuming) reads the file with peft alone."""
    model = load(out / "high", is_trainable=True)
    model.save_pretrained(out / "checkpoint-8")  # what a Trainer saves while the task trains
    flip_data(out / "checkpoint-8" / MAIN, "lora_B.by_task.2")
    with pytest.raises(AdapterFileError) as caught:
        model.load_adapter(out / "checkpoint-8", adapter_name="default", is_trainable=True)
    message = str(caught.value)
    assert "adapter_model.safetensors being loaded into the adapter 'default' is damaged" in message
    assert str(out / "high") not in message, "it is not the file the config was loaded from"


def test_an_edited_config_that_no_longer_describes_the_weights_is_refused(out):
    path = out / "high" / CONFIG
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "r": 5}))
    with pytest.raises(
        AdapterFileError, match=r"does not describe the weights.*r=5 \(saved with the weights: 4\)"
    ):
        load(out / "high")
    path.write_text(json.dumps({**saved, "top_k": 99}))
    with pytest.raises(AdapterFileError, match=r"(?s)not a valid ContinualMoEConfig.*top_k=99"):
        load(out / "high")


def test_an_edited_setting_loads_with_a_warning(out, saves):
    path = out / "high" / CONFIG
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "lora_alpha": 36, "base_model_name_or_path": "x"})
    )
    with pytest.warns(UserWarning, match=r"lora_alpha=36 \(saved with the weights: 16\)") as record:
        model = load(out / "high")
    assert not [w for w in record if "base_model_name_or_path" in str(w.message)]  # peft's own field
    assert model.peft_config["default"].lora_alpha == 36


def test_saves_of_earlier_versions_still_load_silently(out, saves):
    """A manifest without the main file's digests or the config copy (before they existed) is trusted."""
    path = out / "high" / MAIN
    tensors = load_file(path)
    manifest = shards.read_manifest(str(path))
    old = {"layout": manifest["layout"], "shards": manifest["shards"]}
    tensors[shards.MANIFEST_KEY] = torch.tensor(list(json.dumps(old).encode()), dtype=torch.uint8)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert same_state(load(out / "high"), load(saves / "high"))


def test_other_peft_methods_keep_peft_errors(tmp_path):
    """The guards only speak for this library's adapters: a damaged LoRA config fails as it did."""
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".cmoe")]
    truncate(tmp_path / CONFIG)
    with pytest.raises(json.JSONDecodeError) as caught:
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not isinstance(caught.value, AdapterFileError)


def test_a_damaged_hub_revision_names_the_repo_and_the_previous_revision(out, hub_server: FakeHub, saves):
    api, repo = HfApi(token=hub_server.token), "tester/continual"
    api.create_repo(repo)
    for task in ("low", "mid", "high"):
        if task == "high":
            flip_data(out / "high" / MAIN, "lora_A.by_task.2")
        commit = api.upload_folder(folder_path=out / task, repo_id=repo, commit_message=task)
        api.create_tag(repo, tag=task, revision=commit.oid)
    with pytest.raises(AdapterFileError) as caught:
        load(repo, revision="high")
    message = str(caught.value)
    assert f"adapter_model.safetensors of the Hub repo {repo} at revision 'high' is damaged" in message, (
        message
    )
    assert "revision='mid'" in message
    with pytest.raises(AdapterFileError, match="at revision 'high' is damaged"):
        shards.verify_adapter(repo, revision="high")
    assert same_state(load(repo, revision="mid"), load(saves / "mid"))

    truncate(out / "high" / CONFIG)
    commit = api.upload_folder(folder_path=out / "high", repo_id=repo, commit_message="damaged config")
    with pytest.raises(
        AdapterFileError, match=rf"adapter_config\.json of the Hub repo {repo} \(commit {commit.oid[:12]}"
    ):
        load(repo)
    api.delete_file(CONFIG, repo_id=repo)
    with pytest.raises(AdapterFileError, match=rf"adapter_config\.json of the Hub repo {repo} is missing"):
        load(repo)


# -- a save that fails midway leaves the previous one ---------------------------------------------------


def _failing(function, calls: list[str], fail_at: int | None, counts, exception):
    def wrapper(*args, **kwargs):
        if counts(*args, **kwargs):
            calls.append(function.__name__)
            if len(calls) == fail_at:
                raise exception
        return function(*args, **kwargs)

    return wrapper


def _half_written(function, calls: list[str], fail_at: int | None):
    """safetensors' writer running out of space: part of the file is written, then the error."""

    def wrapper(tensors, filename, *args, **kwargs):
        calls.append("save_file")
        if len(calls) == fail_at:
            function(tensors, filename, *args, **kwargs)
            truncate(Path(filename), 0.5)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return function(tensors, filename, *args, **kwargs)

    return wrapper


def _writes(file, mode="r", *args, **kwargs) -> bool:
    return any(flag in mode for flag in "wax+")


def inject(monkeypatch, writer: str, fail_at: int | None) -> list[str]:
    """Make the `fail_at`-th call of `writer` during a save fail; returns the calls seen."""
    calls: list[str] = []
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    if writer == "save_file":
        monkeypatch.setattr(
            peft.peft_model, "safe_save_file", _half_written(peft.peft_model.safe_save_file, calls, fail_at)
        )
        monkeypatch.setattr(shards, "save_file", _half_written(shards.save_file, calls, fail_at))
    elif writer == "open":
        wrapped = _failing(builtins.open, calls, fail_at, _writes, disk_full)
        monkeypatch.setattr(builtins, "open", wrapped)
        monkeypatch.setattr(io, "open", wrapped)
    elif writer == "replace":
        monkeypatch.setattr(
            os, "replace", _failing(os.replace, calls, fail_at, lambda *a, **k: True, disk_full)
        )
    elif writer == "mkdir":  # only the calls that create a folder (makedirs also tries existing ones)
        denied = PermissionError(errno.EACCES, "Permission denied")
        creates = lambda path, *a, **k: not os.path.isdir(path)  # noqa: E731
        monkeypatch.setattr(os, "mkdir", _failing(os.mkdir, calls, fail_at, creates, denied))
    return calls


@pytest.fixture(scope="module")
def newest(saves) -> PeftModel:
    return load(saves / "high")


@pytest.mark.parametrize("writer", ["save_file", "open", "replace", "mkdir"])
def test_a_save_failing_at_any_write_leaves_the_previous_save_intact(out, saves, newest, writer, monkeypatch):
    folder = out / "mid"  # the previous save, overwritten by the state after the next task
    (folder / "optimizer.pt").write_bytes(b"not the adapter's")  # e.g. a Trainer checkpoint's
    before = snapshot(folder)
    shutil.copytree(folder, out / "scratch")
    with monkeypatch.context() as patch:  # count the calls of a save like the one that will fail
        calls = inject(patch, writer, None)
        newest.save_pretrained(out / "scratch")
    assert calls, f"a save makes no {writer} call"
    for fail_at in range(1, len(calls) + 1):
        with monkeypatch.context() as patch:
            inject(patch, writer, fail_at)
            with pytest.raises(AdapterSaveError) as caught:
                newest.save_pretrained(folder)
        message = str(caught.value)
        assert caught.value.errno in (errno.ENOSPC, errno.EACCES)
        assert f"the previous save in {folder} is intact" in message, (fail_at, message)
        assert snapshot(folder) == before, (
            f"{writer} call {fail_at} of {len(calls)} changed the previous save"
        )
    assert same_state(load(folder), load(saves / "mid"))

    newest.save_pretrained(folder)  # the disk has room again
    assert same_state(load(folder), newest) and (folder / "optimizer.pt").exists()
    assert sorted(name for name in os.listdir(folder) if name.startswith(("cmoe", ".cmoe"))) == [LOW, MID]


def test_a_failed_save_into_a_new_folder_leaves_nothing(tmp_path, newest, monkeypatch):
    inject(monkeypatch, "save_file", 2)
    with pytest.raises(AdapterSaveError, match="nothing was left in"):
        newest.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_save_replaces_the_previous_one_whole(out, saves, newest):
    """Saving fewer tasks over more removes the shards the new save lacks; a pickle save the old main file."""
    one = load(out / "low")
    one.save_pretrained(out / "high")
    assert sorted(os.listdir(out / "high")) == sorted([CONFIG, MAIN, "README.md"])
    assert same_state(load(out / "high"), one)
    newest.save_pretrained(out / "high", safe_serialization=False)
    assert sorted(os.listdir(out / "high")) == sorted([CONFIG, "README.md", "adapter_model.bin"])
    with pytest.warns(UserWarning, match="pickle save"):
        assert same_state(load(out / "high"), newest)


def test_a_killed_save_leaves_no_files_behind_for_the_next_one(out, newest):
    (out / "high" / f"{integrity._STAGING_PREFIX}dead").mkdir()  # a save killed while writing
    newest.save_pretrained(out / "high")
    assert not [name for name in os.listdir(out / "high") if name.startswith(".")]


def test_other_peft_methods_save_as_before(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA save went through save_atomically")

    monkeypatch.setattr(integrity, "save_atomically", refuse)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    assert (tmp_path / MAIN).exists()


# -- the trainer's own files: mid-task checkpoints, results.json, hub_pending.json ---------------------


@pytest.fixture(scope="module")
def one_task_with_checkpoints(tmp_path_factory):
    """One task trained with a checkpoint every 4 steps (8 steps): checkpoint-4 and checkpoint-8."""
    from synthetic_stream import moe_model, stream, trainer_for

    root = tmp_path_factory.mktemp("checkpointed")
    trainer = trainer_for(moe_model(), root, max_steps=8, save_strategy="steps", save_steps=4)
    trainer.train_tasks(stream(train=32, evaluate=4)[:1])
    return root


def fresh_trainer(root: Path, source: Path):
    from synthetic_stream import moe_model, trainer_for

    shutil.copytree(source, root)
    return trainer_for(moe_model(), root, max_steps=8, save_strategy="steps", save_steps=4)


def test_a_checkpoint_cut_short_is_skipped_for_the_one_before(one_task_with_checkpoints, tmp_path):
    trainer = fresh_trainer(tmp_path / "out", one_task_with_checkpoints)
    task_dir = tmp_path / "out" / "checkpoints" / "low"
    assert trainer._last_complete_checkpoint(str(task_dir)) == str(task_dir / "checkpoint-8")
    (task_dir / "checkpoint-8" / "locator_features.json").unlink()  # the kill came before it was written
    assert trainer._last_complete_checkpoint(str(task_dir)) == str(task_dir / "checkpoint-4")


@pytest.mark.parametrize("damaged", ["locator_features.safetensors", "expert_usage_counts.safetensors"])
def test_a_damaged_checkpoint_file_is_named_with_the_way_back(damaged, one_task_with_checkpoints, tmp_path):
    trainer = fresh_trainer(tmp_path / "out", one_task_with_checkpoints)
    checkpoint = tmp_path / "out" / "checkpoints" / "low" / "checkpoint-8"
    data = bytearray((checkpoint / damaged).read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # the last tensor's last bytes
    (checkpoint / damaged).write_bytes(bytes(data))
    with pytest.raises(AdapterFileError) as error:
        trainer._last_complete_checkpoint(str(checkpoint.parent))
    message = str(error.value)
    assert f"{checkpoint / damaged} is damaged" in message
    assert "delete that folder to resume from the checkpoint before it" in message
    (checkpoint / damaged).write_bytes(bytes(data[:20]))  # truncated
    with pytest.raises(AdapterFileError, match="cannot be read"):
        trainer._last_complete_checkpoint(str(checkpoint.parent))


def test_damaged_results_and_pending_files_name_themselves(one_task_with_checkpoints, tmp_path):
    from cmoe_adapters import ContinualResult
    from cmoe_adapters.hub import read_pending

    out = tmp_path / "out"
    shutil.copytree(one_task_with_checkpoints, out)
    (out / "results.json").write_text((out / "results.json").read_text()[:-40])
    with pytest.raises(AdapterFileError, match=r"results.json is damaged .*start a new output_dir"):
        ContinualResult.load(str(out))
    (out / "hub_pending.json").write_text('{"low": 1}')
    with pytest.raises(AdapterFileError, match=r"hub_pending.json is damaged .*cmoe push"):
        read_pending(str(out))
