"""The fake Hub behaves like the real one for the `huggingface_hub` calls we use (raw client only)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub
import peft
import pytest
import torch
from conftest import tiny_llama
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:
    from hub_server import FakeHub

pytest_plugins = ["hub_server"]  # the `hub_server` fixture


HUB_MAJOR = int(huggingface_hub.__version__.split(".")[0])


def _transport_error() -> type[Exception]:
    """The network-error class of huggingface_hub's HTTP client: httpx2 from hub 2, httpx before."""
    client = "httpx2" if HUB_MAJOR >= 2 else "httpx"
    return importlib.import_module(client).TransportError


REPO = "tester/cl-adapters"
CONFIG = {"r": 4, "task": "color"}
WEIGHTS = bytes(range(256)) * 8  # binary, not UTF-8: a safetensors-like payload


def _folder(root: Path, config: dict, weights: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps(config))
    (root / "adapter_model.safetensors").write_bytes(weights)
    return root


def _download(repo_id: str, filename: str, revision: str, token: str | bool | None) -> bytes:
    return Path(hf_hub_download(repo_id, filename, revision=revision, token=token)).read_bytes()


@pytest.fixture
def api(hub_server: FakeHub) -> HfApi:
    return HfApi(token=hub_server.token)


@pytest.fixture
def pushed(hub_server: FakeHub, api: HfApi, tmp_path: Path) -> str:
    """A private repo with the adapter folder pushed to main; returns that commit's sha."""
    api.create_repo(REPO, private=True)
    info = api.upload_folder(
        folder_path=_folder(tmp_path / "v1", CONFIG, WEIGHTS), repo_id=REPO, commit_message="color"
    )
    return info.oid


def test_client_is_pointed_at_the_server(hub_server: FakeHub) -> None:
    hub_server.create_repo("tester/public")  # directly, without HTTP
    assert hub_server.endpoint == constants.ENDPOINT == HfApi().endpoint
    assert huggingface_hub.model_info("tester/public").id == "tester/public"  # bound to an import-time HfApi
    assert huggingface_hub.file_exists("tester/public", ".gitattributes")  # what peft calls
    assert HfApi(token=hub_server.token).whoami()["name"] == "tester"
    assert (
        Path(constants.HF_HUB_CACHE).parent == Path(constants.HF_HOME) != Path.home() / ".cache/huggingface"
    )
    assert constants.HF_HUB_DISABLE_TELEMETRY and not constants.HF_HUB_OFFLINE
    assert {r.path for r in hub_server.requests} >= {"/api/models/tester/public", "/api/whoami-v2"}


def test_point_hf_client_at_restores_the_client(tmp_path: Path) -> None:
    from hub_server import point_hf_client_at, run_hub_server  # after pytest imported it as a plugin

    before = (
        constants.ENDPOINT,
        constants.HUGGINGFACE_CO_URL_TEMPLATE,
        constants.HF_HUB_CACHE,
        HfApi().endpoint,
    )
    with run_hub_server() as hub, point_hf_client_at(hub.endpoint, tmp_path):
        hub.create_repo("tester/public")
        assert HfApi().list_repo_files("tester/public") == [".gitattributes"]
        assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub.endpoint + "/")
    after = (
        constants.ENDPOINT,
        constants.HUGGINGFACE_CO_URL_TEMPLATE,
        constants.HF_HUB_CACHE,
        HfApi().endpoint,
    )
    assert after == before


def test_branch_tag_and_sha_downloads_and_main_moving_on(
    hub_server: FakeHub, api: HfApi, pushed: str, tmp_path: Path
) -> None:
    api.create_branch(REPO, branch="adapters/color", revision=pushed)  # "/" travels as %2F
    api.create_tag(REPO, tag="color", revision="adapters/color", tag_message="after task color")
    for revision in ("main", "adapters/color", "color", pushed, pushed[:7]):
        assert _download(REPO, "adapter_model.safetensors", revision, hub_server.token) == WEIGHTS
        assert json.loads(_download(REPO, "adapter_config.json", revision, hub_server.token)) == CONFIG

    new_weights = WEIGHTS[::-1]
    folder = _folder(tmp_path / "v2", {**CONFIG, "task": "shape"}, new_weights)
    moved = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="shape").oid
    assert moved != pushed
    assert _download(REPO, "adapter_model.safetensors", "main", hub_server.token) == new_weights
    assert _download(REPO, "adapter_model.safetensors", "color", hub_server.token) == WEIGHTS
    assert _download(REPO, "adapter_model.safetensors", pushed, hub_server.token) == WEIGHTS
    assert api.model_info(REPO, revision="color").sha == pushed
    assert api.model_info(REPO).sha == moved
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [moved, pushed]

    refs = api.list_repo_refs(REPO)
    assert {r.name: r.target_commit for r in refs.branches} == {"main": moved, "adapters/color": pushed}
    assert {r.name: (r.ref, r.target_commit) for r in refs.tags} == {"color": ("refs/tags/color", pushed)}

    repo = hub_server.repo(REPO)
    assert repo.private
    assert repo.branches["main"] == moved and repo.tags == {"color": pushed}
    assert repo.files("color")["adapter_model.safetensors"] == WEIGHTS
    assert set(repo.files("main")) == {".gitattributes", "adapter_config.json", "adapter_model.safetensors"}
    assert api.list_repo_files(REPO, revision="color") == sorted(repo.files("color"))
    assert not repo.ambiguous


def test_private_repo_is_invisible_to_anonymous_and_intruder(hub_server: FakeHub, pushed: str) -> None:
    calls = (
        lambda api, token: api.model_info(REPO),
        lambda api, token: api.list_repo_refs(REPO),
        lambda api, token: api.list_repo_files(REPO),
        lambda api, token: hf_hub_download(REPO, "adapter_config.json", token=token),
        lambda api, token: snapshot_download(REPO, token=token),
        lambda api, token: api.create_tag(REPO, tag="stolen"),
        lambda api, token: api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO),
    )
    for token, status in ((False, 401), (hub_server.other_token, 404)):
        other = HfApi(token=token)
        for call in calls:
            with pytest.raises(RepositoryNotFoundError) as error:
                call(other, token)
            assert error.value.response.status_code == status
        assert not other.repo_exists(REPO)
    assert HfApi(token=hub_server.token).repo_exists(REPO)
    assert hub_server.repo(REPO).tags == {}
    assert set(hub_server.repo(REPO).files()) == {
        ".gitattributes",
        "adapter_config.json",
        "adapter_model.safetensors",
    }


def test_public_repo_is_readable_but_not_writable_by_others(
    hub_server: FakeHub, api: HfApi, tmp_path: Path
) -> None:
    api.create_repo("tester/public")
    api.upload_folder(folder_path=_folder(tmp_path, CONFIG, WEIGHTS), repo_id="tester/public")
    assert _download("tester/public", "adapter_model.safetensors", "main", False) == WEIGHTS
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=hub_server.other_token).create_branch("tester/public", branch="mine")
    assert error.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=hub_server.read_token).create_tag("tester/public", tag="v1")
    assert error.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=hub_server.other_token).create_repo("tester/squatting")
    assert error.value.response.status_code == 403


def test_unknown_revision_missing_file_and_unknown_repo(hub_server: FakeHub, api: HfApi, pushed: str) -> None:
    for call in (
        lambda: api.model_info(REPO, revision="no-such-task"),
        lambda: api.list_repo_files(REPO, revision="no-such-task"),
        lambda: hf_hub_download(REPO, "adapter_config.json", revision="no-such-task", token=hub_server.token),
        lambda: hf_hub_download(REPO, "adapter_config.json", revision="0" * 40, token=hub_server.token),
        lambda: snapshot_download(REPO, revision="no-such-task", token=hub_server.token),
        lambda: api.create_branch(REPO, branch="b", revision="no-such-task"),
        lambda: api.create_tag(REPO, tag="bad tag name", revision="no-such-task"),
    ):
        with pytest.raises(RevisionNotFoundError):
            call()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.safetensors", token=hub_server.token)
    assert not api.file_exists(REPO, "missing.safetensors")
    assert api.file_exists(REPO, "adapter_config.json", revision=pushed)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/never-created")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/never-created", "adapter_config.json", token=hub_server.token)
    with pytest.raises(RepositoryNotFoundError):
        api.create_commit("tester/never-created", [CommitOperationAdd("a", b"a")], commit_message="m")


def test_wrong_token_is_rejected_with_401(hub_server: FakeHub, pushed: str) -> None:
    wrong = HfApi(token="hf_not_a_real_token")
    for call in (
        lambda: wrong.create_repo("tester/other"),
        lambda: wrong.create_commit(REPO, [CommitOperationAdd("a", b"a")], commit_message="m"),
        lambda: wrong.create_tag(REPO, tag="v1"),
        lambda: hf_hub_download(REPO, "adapter_config.json", token="hf_not_a_real_token"),
    ):
        with pytest.raises(HfHubHTTPError) as error:
            call()
        assert error.value.response.status_code == 401
        assert not isinstance(error.value, RepositoryNotFoundError)  # a bad token is not a missing repo
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=False).create_repo("tester/anonymous")
    assert error.value.response.status_code == 401
    assert len(hub_server.repo(REPO).commits) == 2  # initial commit + the push


def test_ref_rules_match_the_hub(hub_server: FakeHub, api: HfApi, pushed: str) -> None:
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(REPO)
    assert error.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO

    api.create_tag(REPO, tag="color")
    with pytest.raises(HfHubHTTPError) as error:
        api.create_tag(REPO, tag="color", revision=hub_server.repo(REPO).history()[-1].oid)
    assert error.value.response.status_code == 409
    api.create_tag(REPO, tag="color", exist_ok=True)  # exist_ok does not move the tag
    assert hub_server.repo(REPO).tags["color"] == pushed

    api.create_branch(REPO, branch="shape")
    with pytest.raises(HfHubHTTPError, match="Reference refs/heads/shape already exists"):
        api.create_branch(REPO, branch="shape")
    api.create_branch(REPO, branch="shape", exist_ok=True)

    for bad in ("bad name", "a..b", "refs/pr/1", "-x", "x.lock", "a//b", "f" * 40, "x~1", "x:y"):
        with pytest.raises(BadRequestError):
            api.create_branch(REPO, branch=bad)
        with pytest.raises(BadRequestError):
            api.create_tag(REPO, tag=bad)

    with pytest.raises(HfHubHTTPError, match="Cannot delete refs/heads/main"):
        api.delete_branch(REPO, branch="main")
    with pytest.raises(RevisionNotFoundError):
        api.delete_branch(REPO, branch="color")  # a tag, not a branch
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(REPO, tag="shape")  # a branch, not a tag
    api.delete_branch(REPO, branch="shape")
    api.delete_tag(REPO, tag="color")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="color")

    # Like the Hub, a branch may share a tag's name; reading such a name is recorded as ambiguous.
    api.create_tag(REPO, tag="task")
    api.create_branch(REPO, branch="task")
    api.model_info(REPO, revision="task")
    assert hub_server.repo(REPO).ambiguous == ["task"]


def test_commits_respect_parent_and_branches(hub_server: FakeHub, api: HfApi, pushed: str) -> None:
    initial = hub_server.repo(REPO).history()[-1].oid
    with pytest.raises(HfHubHTTPError, match="A commit has happened since") as error:
        api.create_commit(REPO, [CommitOperationAdd("x", b"x")], commit_message="m", parent_commit=initial)
    assert error.value.response.status_code == 412
    ok = api.create_commit(REPO, [CommitOperationAdd("x", b"x")], commit_message="m", parent_commit=pushed)
    assert hub_server.repo(REPO).branches["main"] == ok.oid

    with pytest.raises(RevisionNotFoundError):
        api.create_commit(REPO, [CommitOperationAdd("x", b"y")], commit_message="m", revision="no-branch")
    api.create_tag(REPO, tag="v1")
    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit(REPO, [CommitOperationAdd("x", b"y")], commit_message="m", revision="v1")
    assert error.value.response.status_code == 400

    # Branch commits leave main alone; re-pushing identical bytes is skipped by the client (no commit).
    api.create_branch(REPO, branch="side")
    side = api.create_commit(REPO, [CommitOperationAdd("x", b"side")], commit_message="m", revision="side")
    assert hub_server.repo(REPO).branches == {"main": ok.oid, "side": side.oid}
    again = api.create_commit(REPO, [CommitOperationAdd("x", b"side")], commit_message="m", revision="side")
    assert again.oid == side.oid


def test_fail_next_fails_a_commit_and_a_retry_succeeds(hub_server: FakeHub, api: HfApi, pushed: str) -> None:
    hub_server.fail_next(path_contains="/commit/")
    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit(REPO, [CommitOperationAdd("x", b"x")], commit_message="m")
    assert error.value.response.status_code == 500
    assert hub_server.repo(REPO).branches["main"] == pushed
    retried = api.create_commit(REPO, [CommitOperationAdd("x", b"x")], commit_message="m")
    assert hub_server.repo(REPO).branches["main"] == retried.oid

    hub_server.fail_next(path_contains="/tag/", disconnect=True)  # a network error, no answer at all
    with pytest.raises(_transport_error()):
        api.create_tag(REPO, tag="color")
    assert hub_server.repo(REPO).tags == {}

    hub_server.fail_next(path_contains="/commit/", apply_first=True)  # lands, but the answer is lost
    with pytest.raises(HfHubHTTPError):
        api.create_commit(REPO, [CommitOperationAdd("y", b"y")], commit_message="m")
    assert hub_server.repo(REPO).files()["y"] == b"y"
    assert [r.status for r in hub_server.requests if "/commit/" in r.path] == [200, 500, 200, 500]


CLIENT_2 = pytest.mark.skipif(
    HUB_MAJOR < 2,
    reason="checks the fake Hub against a feature of huggingface_hub 2's upload_folder (retried commits, "
    "unchanged files left out) that 1.x's client does not have",
)


@CLIENT_2
def test_upload_folder_retries_5xx_but_not_4xx(
    hub_server: FakeHub, api: HfApi, pushed: str, tmp_path: Path
) -> None:
    # With hf_xet installed, upload_folder commits through a pipeline that retries 5xx and network errors.
    hub_server.fail_next(path_contains="/commit/")
    first = api.upload_folder(folder_path=_folder(tmp_path / "a", {"v": 1}, b"a"), repo_id=REPO).oid
    hub_server.fail_next(path_contains="/commit/", disconnect=True)
    second = api.upload_folder(folder_path=_folder(tmp_path / "b", {"v": 2}, b"b"), repo_id=REPO).oid
    assert [c.oid for c in hub_server.repo(REPO).history()[:3]] == [second, first, pushed]
    assert [r.status for r in hub_server.requests if "/commit/" in r.path] == [200, 500, 200, 0, 200]

    hub_server.fail_next(6, path_contains="/commit/")  # 1 try + 5 retries
    with pytest.raises(HfHubHTTPError) as error:
        api.upload_folder(folder_path=_folder(tmp_path / "c", {"v": 3}, b"c"), repo_id=REPO)
    assert error.value.response.status_code == 500
    hub_server.fail_next(path_contains="/commit/", status=413)
    with pytest.raises(HfHubHTTPError) as error:
        api.upload_folder(folder_path=tmp_path / "c", repo_id=REPO)
    assert error.value.response.status_code == 413
    assert hub_server.repo(REPO).branches["main"] == second


@CLIENT_2
def test_bytes_received_counts_uploads(hub_server: FakeHub, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO, private=True)
    assert hub_server.bytes_received == 0
    payload = bytes(range(256)) * 64  # 16 KiB
    api.upload_folder(folder_path=_folder(tmp_path, CONFIG, payload), repo_id=REPO, commit_message="c1")
    first = hub_server.bytes_received
    assert first >= len(payload) * 4 / 3  # base64 inline in the NDJSON commit
    (record,) = hub_server.commits
    assert record.bytes == first and record.message == "c1" and record.revision == "main"
    assert record.files == {
        "adapter_config.json": json.dumps(CONFIG).encode(),
        "adapter_model.safetensors": payload,
    }
    assert record.user == "tester" and record.repo_id == REPO

    # Unchanged files are not sent again; only the changed config travels.
    (tmp_path / "adapter_config.json").write_text(json.dumps({**CONFIG, "r": 8}))
    api.upload_folder(folder_path=tmp_path, repo_id=REPO, commit_message="c2")
    assert set(hub_server.commits[-1].files) == {"adapter_config.json"}
    assert hub_server.bytes_received - first < len(payload)
    assert hub_server.bytes_received == sum(c.bytes for c in hub_server.commits)


def test_upload_folder_without_xet_uses_plain_create_commit(
    hub_server: FakeHub, api: HfApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    api.create_repo(REPO, private=True)
    api.upload_folder(folder_path=_folder(tmp_path, CONFIG, WEIGHTS), repo_id=REPO)
    assert hub_server.repo(REPO).files()["adapter_model.safetensors"] == WEIGHTS


def test_snapshot_download_of_a_tag(hub_server: FakeHub, api: HfApi, pushed: str, tmp_path: Path) -> None:
    api.create_tag(REPO, tag="color")
    api.upload_folder(folder_path=_folder(tmp_path / "v2", {"task": "shape"}, b"new"), repo_id=REPO)
    folder = Path(snapshot_download(REPO, revision="color", token=hub_server.token))
    assert folder.name == pushed
    assert (folder / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert json.loads((folder / "adapter_config.json").read_text()) == CONFIG
    local = Path(
        snapshot_download(REPO, revision="color", token=hub_server.token, local_dir=tmp_path / "local")
    )
    assert (local / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_peft_loads_an_adapter_from_a_tag(hub_server: FakeHub, api: HfApi, tmp_path: Path) -> None:
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), lora).eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "color")
    api.create_repo(REPO, private=True)
    api.upload_folder(folder_path=tmp_path / "color", repo_id=REPO, commit_message="color")
    api.create_tag(REPO, tag="color")
    torch.manual_seed(5)
    peft.get_peft_model(tiny_llama(), lora).save_pretrained(tmp_path / "shape")
    api.upload_folder(folder_path=tmp_path / "shape", repo_id=REPO, commit_message="shape")  # main moves on

    loaded = peft.PeftModel.from_pretrained(
        tiny_llama(), REPO, revision="color", token=hub_server.token
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    resolved = {r.path for r in hub_server.requests if "/resolve/" in r.path}
    assert f"/{REPO}/resolve/color/adapter_model.safetensors" in resolved
    with pytest.raises(RepositoryNotFoundError):
        peft.PeftModel.from_pretrained(tiny_llama(), REPO, revision="color", token=hub_server.other_token)
