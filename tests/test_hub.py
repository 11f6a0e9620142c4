"""Per-task pushes to a strict Hub-compatible server, pulls by revision, failures and retries."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from peft import PeftModel
from synthetic_stream import TASKS, moe_model, records, stream, trainer_for

from cmoe_adapters import ContinualMoEConfig, ContinualResult
from cmoe_adapters.hub import PENDING_FILE, model_card, read_pending

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
    assert "## Task locator" in card and "| task \\ located to | low | mid | none (base model) |" in card
    assert "open-set rate" in card and "| `locator_open_set` | `base` |" in card


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
    hub_server.clear_faults()  # older clients retry less, so some injected failures may be left
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


def assert_same_outputs(model, other, ids) -> None:
    for name in model.tasks:
        assert torch.equal(model(input_ids=ids, task=name).logits, other(input_ids=ids, task=name).logits)
    if len(model.tasks) > 1:
        assert torch.equal(model.task_probabilities(input_ids=ids), other.task_probabilities(input_ids=ids))


def test_each_push_sends_only_what_changed_and_every_revision_loads_exactly(tmp_path, hub_server):
    trainer = hub_trainer(tmp_path, hub_server)
    trainer.train_tasks(stream(train=32, evaluate=8))
    repo = hub_server.repo(REPO)
    pushes = [commit for commit in hub_server.commits if commit.message.startswith("State after task")]
    assert [commit.message for commit in pushes] == [f"State after task '{t}'" for t in TASKS]
    changed = {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    # a push sends the main file, the shard of the task that just became old, the config and the card
    assert set(pushes[0].files) == changed
    assert set(pushes[1].files) == changed | {"cmoe_task-000-low.safetensors"}
    assert set(pushes[2].files) == changed | {"cmoe_task-001-mid.safetensors"}
    assert all(not commit.deleted for commit in pushes)

    ids = probe_ids()
    for task, older in [("low", []), ("mid", ["low"]), ("high", ["low", "mid"])]:
        files = repo.files(task)
        assert sorted(name for name in files if name.startswith("cmoe_task-")) == [
            f"cmoe_task-{i:03d}-{name}.safetensors" for i, name in enumerate(older)
        ]
        local = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out" / task)
        pulled = PeftModel.from_pretrained(tiny_llama(), REPO, revision=task, token=hub_server.token)
        assert pulled.tasks == local.tasks == [*older, task]
        assert_same_outputs(pulled, local, ids)
        # the same through load_adapter under another adapter name
        local.load_adapter(REPO, adapter_name="pulled", revision=task, token=hub_server.token)
        local.set_adapter("pulled")
        assert_same_outputs(pulled, local, ids)


def test_pushing_an_older_state_over_a_newer_one_drops_the_newer_shards(tmp_path, hub_server):
    from cmoe_adapters.hub import HubTarget

    model = moe_model()
    target = HubTarget(REPO, token=hub_server.token)
    target.ensure_repo()
    for task in ("low", "mid", "high"):
        model.add_task(task)
        model.save_pretrained(tmp_path / task)
    target.push_task(str(tmp_path / "high"), "high", latest=True)
    target.push_task(str(tmp_path / "mid"), "mid", latest=False)  # on a side branch made from main
    repo = hub_server.repo(REPO)
    assert "cmoe_task-001-mid.safetensors" in repo.files("high")
    assert sorted(name for name in repo.files("mid") if name.startswith("cmoe_task-")) == [
        "cmoe_task-000-low.safetensors"
    ]
    pulled = PeftModel.from_pretrained(tiny_llama(), REPO, revision="mid", token=hub_server.token)
    assert pulled.tasks == ["low", "mid"]


def card_config(**overrides) -> ContinualMoEConfig:
    config = ContinualMoEConfig(r=4, **overrides)
    config.task_records = [{"name": "color"}, {"name": "shape"}]
    config.base_model_name_or_path = "tiny/llava"
    return config


def test_the_model_card_reports_the_locator_per_task_and_its_open_set_rate():
    result = ContinualResult(
        tasks=["color", "shape"],
        accuracy_matrix=[[0.9], [0.8, 0.7]],
        locator_confusion=[[9, 0, 1], [1, 7, 2]],
    )
    card = model_card(card_config(locator_density="gaussian"), result, "me/run", "shape")
    assert "## Task locator" in card
    assert "Locator accuracy 80.0%, open-set rate 15.0%." in card
    assert "*none* means it placed the sample in none of the learnt tasks" in card
    assert "the base model answers such a sample itself" in card
    assert (
        "| color | 90.0 | 0.0 | 10.0 | 90.0 | 10 |" in card
        and "| shape | 10.0 | 70.0 | 20.0 | 70.0 | 10 |" in card
    )
    for field_name, value in (
        ("locator_feature_source", "first_layer_input"),
        ("locator_pooling", "text_image_moments"),
        ("locator_density", "gaussian"),
        ("locator_open_set", "base"),
        ("locator_open_set_fence", "10.0"),
    ):
        assert f"| `{field_name}` | `{value}` |" in card
    assert card.index("## Accuracy") < card.index("## Task locator") < card.index("## Configuration")

    nearest = model_card(card_config(locator_open_set="nearest"), result, "me/run", "shape")
    assert "with `locator_open_set='nearest'` this adapter never does" in nearest
    old = ContinualResult(
        tasks=["color", "shape"], accuracy_matrix=[[0.9], [0.8, 0.7]], locator_confusion=[[9, 1], [2, 8]]
    )
    assert "open-set rate not recorded (saved before the open set)" in model_card(
        card_config(), old, None, None
    )
    no_locator = ContinualResult(tasks=["color"], accuracy_matrix=[[0.9]])
    assert "## Task locator" not in model_card(card_config(), no_locator, None, None)
