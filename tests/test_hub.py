"""Per-task pushes to a strict Hub-compatible server, pulls by revision, failures and retries."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from peft import PeftModel
from synthetic_stream import moe_model, records, stream, trainer_for

from cmoe_adapters.hub import PENDING_FILE, read_pending

pytest_plugins = ["hub_server"]
REPO = "tester/continual"


def hub_trainer(tmp_path, hub, token=None, **overrides):
    return trainer_for(
        moe_model(),
        tmp_path / "out",
        max_steps=8,
        push_to_hub=True,
        hub_model_id=REPO,
        hub_token=token or hub.token,
        hub_private_repo=True,
        **overrides,
    )


def probe_ids() -> torch.Tensor:
    return torch.tensor([r["prompt"] for r in records("low", 3, 9) + records("mid", 3, 9)])


def test_every_task_is_pushed_and_pulled_back_by_revision(tmp_path, hub_server):
    trainer = hub_trainer(tmp_path, hub_server)
    trainer.train_tasks(stream(train=32, evaluate=8)[:2])
    repo = hub_server.repo(REPO)
    assert repo.private and set(repo.tags) == {"low", "mid"}
    assert repo.tags["mid"] == repo.branches["main"], "main holds the latest state"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(repo.files("low"))
    assert not os.path.exists(tmp_path / "out" / PENDING_FILE)

    ids = probe_ids()
    for task in ("low", "mid"):
        local = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out" / task)
        pulled = PeftModel.from_pretrained(tiny_llama(), REPO, revision=task, token=hub_server.token)
        assert pulled.tasks == local.tasks == (["low"] if task == "low" else ["low", "mid"])
        assert torch.equal(pulled(input_ids=ids).logits, local(input_ids=ids).logits)
        if task == "mid":
            torch.testing.assert_close(
                pulled.task_probabilities(input_ids=ids),
                local.task_probabilities(input_ids=ids),
                rtol=0,
                atol=0,
            )
    # load_adapter gives the same state under another adapter name
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out" / "mid")
    model.load_adapter(REPO, adapter_name="pulled", revision="mid", token=hub_server.token)
    model.set_adapter("pulled")
    assert model.tasks == ["low", "mid"]
    assert torch.equal(model(input_ids=ids).logits, trainer.model(input_ids=ids).logits)

    card = repo.files("mid")["README.md"].decode()
    assert card.startswith("---\nlibrary_name: peft\n") and "- continual-learning" in card
    assert "`low` → `mid`" in card and "| after \\ on | low | mid |" in card and 'revision="mid"' in card


def test_a_failed_push_keeps_the_local_save_and_is_retried(tmp_path, hub_server):
    trainer = hub_trainer(tmp_path, hub_server)
    low, mid, _ = stream(train=32, evaluate=8)
    hub_server.fail_next(n=1, path_contains="/commit/", status=422)
    with pytest.warns(UserWarning, match=r"(?s)Pushing task .low.*failed.*local save.*is intact"):
        trainer.train_task(low)
    assert read_pending(str(tmp_path / "out")) == ["low"]
    assert os.path.exists(tmp_path / "out" / "low" / "adapter_model.safetensors")
    assert "low" not in hub_server.repo(REPO).tags

    # the next task waits behind the failed one, so the Hub never sees the tasks out of order
    hub_server.fail_next(n=1, path_contains="/commit/", status=422)
    with pytest.warns(UserWarning, match="Pushing task 'low'"):
        trainer.train_task(mid)
    assert read_pending(str(tmp_path / "out")) == ["low", "mid"]

    assert trainer.push_pending() == []
    repo = hub_server.repo(REPO)
    assert set(repo.tags) == {"low", "mid"} and repo.tags["mid"] == repo.branches["main"]
    assert set(repo.branches) == {"main"}, "the side branch of the older task is gone"
    ids = probe_ids()
    low_state = PeftModel.from_pretrained(tiny_llama(), REPO, revision="low", token=hub_server.token)
    local_low = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out" / "low")
    assert torch.equal(low_state(input_ids=ids).logits, local_low(input_ids=ids).logits)
    assert not os.path.exists(tmp_path / "out" / PENDING_FILE)


def test_a_network_error_half_way_through_a_push(tmp_path, hub_server):
    trainer = hub_trainer(tmp_path, hub_server)
    low = stream(train=32, evaluate=8)[0]
    hub_server.fail_next(n=10, path_contains="/commit/", disconnect=True)
    with pytest.warns(UserWarning, match="Pushing task 'low'"):
        trainer.train_task(low)
    hub_server.fail_next(n=0)
    assert read_pending(str(tmp_path / "out")) == ["low"]
    assert trainer.push_pending() == [] and "low" in hub_server.repo(REPO).tags


def test_private_repo_with_a_wrong_token(tmp_path, hub_server):
    HfApi(token=hub_server.token).create_repo(REPO, private=True)
    trainer = hub_trainer(tmp_path, hub_server, token=hub_server.other_token)
    with pytest.warns(UserWarning, match="Pushing task 'low'"):
        trainer.train_task(stream(train=32, evaluate=8)[0])
    assert read_pending(str(tmp_path / "out")) == ["low"]
    assert not hub_server.repo(REPO).tags
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=hub_server.other_token).model_info(REPO)


def test_pushing_again_uploads_nothing_that_did_not_change(tmp_path, hub_server):
    trainer = hub_trainer(tmp_path, hub_server)
    trainer.train_task(stream(train=32, evaluate=8)[0])
    commits = len(hub_server.commits)
    received = hub_server.bytes_received
    out = str(tmp_path / "out")
    from cmoe_adapters.hub import write_pending

    write_pending(out, ["low"])
    assert trainer.push_pending() == []
    assert hub_server.bytes_received == received and len(hub_server.commits) == commits
