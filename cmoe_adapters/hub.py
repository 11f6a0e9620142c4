"""Pushing every finished task to the Hugging Face Hub, and the model card.

Each task's state is one commit holding the PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``, one ``cmoe_task-*.safetensors`` shard per finished task, see
shards.py) and a model card, tagged with the task's name, so that
``PeftModel.from_pretrained(base, repo_id, revision="<task>")`` gives back exactly the state after
that task. The main branch (or ``hub_revision``) always holds the latest state. A push that fails
never touches the local save: the task is recorded as pending and pushed later; a pending task
that is older than the latest one is committed on a temporary side branch, so main never moves
back in time. Unchanged files (the shards of older tasks) are not uploaded again, and shards that
the pushed state does not have are deleted in the same commit.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoFile

from .results import ContinualResult, write_atomically
from .shards import SHARD_GLOB

PENDING_FILE = "hub_pending.json"
_CONFIG_FIELDS = ("r", "lora_alpha", "num_experts", "top_k", "experts_per_task", "router_aux_loss_coef")
_METHOD_FIELDS = (
    "expansion",
    "dual_router",
    "momentum_merge",
    "freeze_old_experts",
    "locator_feature_source",
    "locator_pooling",
    "locator_density",
    "locator_open_set",
    "locator_open_set_fence",
)
_OPEN_SET_WORDS = {  # what `none` in the locator's table means under each `locator_open_set`
    "base": "the base model answers such a sample itself, its adapters off.",
    "nearest": "with `locator_open_set='nearest'` this adapter never does: such a sample still goes "
    "to its nearest task.",
    "error": "with `locator_open_set='error'` this adapter refuses such a sample with an error.",
}


@dataclass
class HubTarget:
    """Where and how to push: the repository, its branch, the token and visibility."""

    repo_id: str
    token: str | None = None
    private: bool | None = None
    branch: str = "main"

    def api(self) -> HfApi:
        return HfApi(token=self.token)

    def ensure_repo(self) -> str:
        """Create the repository if needed; returns its full id (``namespace/name``)."""
        url = self.api().create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
        self.repo_id = url.repo_id
        return self.repo_id

    def push_task(self, folder: str, task: str, *, latest: bool) -> str:
        """Commit `folder` as the state after `task`, tag it with the task's name; returns the commit."""
        api = self.api()
        message = f"State after task '{task}'"
        if latest:
            commit = self._commit_changes(api, folder, self.branch, message)
        else:  # an older task retried after a newer one landed: keep main where it is
            side = f"cmoe-pending-{task}"
            api.create_branch(self.repo_id, branch=side, revision=self.branch, exist_ok=True)
            try:
                commit = self._commit_changes(api, folder, side, message)
            finally:
                api.delete_branch(self.repo_id, branch=side)
        self._tag(api, task, commit)
        return commit

    def _commit_changes(self, api: HfApi, folder: str, revision: str, message: str) -> str:
        """One commit on `revision` that makes it hold exactly `folder`'s files; returns its id.

        Only files whose content differs from the revision's are sent (the shards of older tasks
        are already there), and shards that `folder` lacks are deleted; with nothing to change no
        commit is made and the revision's head is returned. Decided here from the file digests,
        not left to the client, whose ``upload_folder`` resends unchanged files before
        huggingface_hub 2.
        """
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(self.repo_id, revision=revision, recursive=True)
            if isinstance(entry, RepoFile)
        }
        local = {
            os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"): os.path.join(root, name)
            for root, _, names in os.walk(folder)
            for name in names
        }
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=full)
            for path, full in sorted(local.items())
            if path not in remote or not _same_content(full, remote[path])
        ]
        operations += [
            CommitOperationDelete(path_in_repo=path)
            for path in sorted(remote)
            if path not in local and fnmatch.fnmatch(path, SHARD_GLOB)
        ]
        if not operations:
            return api.repo_info(self.repo_id, revision=revision).sha
        return api.create_commit(self.repo_id, operations, commit_message=message, revision=revision).oid

    def _tag(self, api: HfApi, task: str, commit: str) -> None:
        refs = api.list_repo_refs(self.repo_id)
        existing = {tag.name: tag.target_commit for tag in refs.tags}
        if existing.get(task) == commit:
            return
        if task in existing:  # a re-push after a resume: the tag moves to the new state
            api.delete_tag(self.repo_id, tag=task)
        api.create_tag(self.repo_id, tag=task, revision=commit, tag_message=f"State after task '{task}'")


def _same_content(path: str, remote: RepoFile) -> bool:
    """Whether the local file at `path` has the content of the remote file (by its LFS or git digest)."""
    if remote.lfs is not None:
        digest = hashlib.sha256()
        expected = remote.lfs.sha256
    else:  # a plain git blob: sha1 of "blob <size>\0" + content
        digest = hashlib.sha1()
        digest.update(f"blob {os.path.getsize(path)}\0".encode())
        expected = remote.blob_id
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == expected


def read_pending(output_dir: str) -> list[str]:
    path = os.path.join(output_dir, PENDING_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        tasks = json.loads(text)
        if not (isinstance(tasks, list) and all(isinstance(task, str) for task in tasks)):
            raise ValueError("expected a list of task names")
    except ValueError as error:
        from .integrity import AdapterFileError

        raise AdapterFileError(
            f"{path} is damaged ({error}). It lists the finished tasks whose push has not succeeded; "
            "to recover, delete it and push every finished task again: `cmoe push <output_dir> "
            "--hub-model-id <repo>` (unchanged files are not uploaded twice)."
        ) from None
    return tasks


def write_pending(output_dir: str, tasks: list[str]) -> None:
    path = os.path.join(output_dir, PENDING_FILE)
    if tasks:
        write_atomically(path, json.dumps(tasks))
    elif os.path.exists(path):
        os.remove(path)


@dataclass
class PushReport:
    """What `push_finished` did: the tasks pushed (with their commits), the failure that stopped it
    (task, error) if any, and the tasks still pending afterwards (also in ``hub_pending.json``)."""

    pushed: dict[str, str] = field(default_factory=dict)
    failure: tuple[str, Exception] | None = None
    pending: list[str] = field(default_factory=list)


def push_finished(
    target: HubTarget, output_dir: str, tasks: Sequence[str], finished: Sequence[str]
) -> PushReport:
    """Push `tasks` (finished tasks saved in ``output_dir/<task>``) in stream order; never raises.

    The first failure stops the loop: that task and every later one stay pending, so a later task
    never overtakes an earlier one on the Hub, and the local saves are untouched. ``main`` moves
    forward only: a task goes to main unless a later task of `finished` is already tagged there.
    """
    todo = [task for task in finished if task in set(tasks)]
    report = PushReport()
    try:
        target.ensure_repo()
        tagged = {tag.name for tag in target.api().list_repo_refs(target.repo_id).tags} if todo else set()
    except Exception as error:  # the repository cannot be reached: nothing is pushed
        report.failure = (todo[0] if todo else "", error)
        todo_left = todo
    else:
        todo_left = []
        for position, task in enumerate(todo):
            latest = not any(later in tagged for later in finished[finished.index(task) + 1 :])
            try:
                report.pushed[task] = target.push_task(os.path.join(output_dir, task), task, latest=latest)
            except Exception as error:  # the task and every later one stay pending
                report.failure, todo_left = (task, error), todo[position:]
                break
            tagged.add(task)
    left = {task for task in read_pending(output_dir) if task not in report.pushed} | set(todo_left)
    report.pending = sorted(
        left, key=lambda task: finished.index(task) if task in finished else len(finished)
    )
    write_pending(output_dir, report.pending)
    return report


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def model_card(config: Any, result: ContinualResult | None, repo_id: str | None, task: str | None) -> str:
    """The README.md of a pushed state: Hub metadata, tasks, accuracy matrix, config, how to load."""
    base = getattr(config, "base_model_name_or_path", None)
    metadata = ["---", "library_name: peft"]
    if base:
        metadata.append(f"base_model: {base}")
    metadata += [
        "tags:",
        "- cmoe-adapters",
        "- continual-learning",
        "- mixture-of-experts",
        "- lora",
        "---",
        "",
    ]
    tasks = list(getattr(config, "task_names", []))
    name = repo_id or "cmoe-adapter"
    lines = [f"# {name.split('/')[-1]}", ""]
    lines.append(
        "A continual mixture of LoRA experts trained with "
        "[cmoe_adapters](https://pypi.org/project/cmoe-adapters/): one router per task in every "
        "adapted layer, a task locator that picks each sample's task at inference."
    )
    lines.append("")
    if tasks:
        lines.append("Tasks, in the order they were learnt: " + " → ".join(f"`{t}`" for t in tasks) + ".")
        if task:
            lines.append(
                f"This revision holds the state after task `{task}`; every task has a revision (tag) "
                "of its own."
            )
        lines.append("")
    if result is not None and result.accuracy_matrix:
        lines += [
            "## Accuracy",
            "",
            "Scores in %; rows: after training a task, columns: evaluated on a task, with tasks located",
            "by the model (no task label given).",
            "",
            result.accuracy_markdown(),
        ]
    locator = result.locator_markdown() if result is not None else ""
    if locator:
        policy = getattr(config, "locator_open_set", "base")
        rate = result.open_set_rate
        rate_words = "not recorded (saved before the open set)" if rate is None else f"{_percent(rate)}%"
        lines += [
            "## Task locator",
            "",
            f"Locator accuracy {_percent(result.locator_accuracy)}%, open-set rate {rate_words}. "
            "The locator picks each sample's task from the sample alone; *none* means it placed the "
            "sample in none of the learnt tasks: "
            + _OPEN_SET_WORDS.get(policy, f"`locator_open_set={policy!r}`.")
            + " The open-set rate is the share of the learnt tasks' own eval samples placed in none "
            "(ideally 0).",
            "",
            locator,
        ]
    lines += ["## Configuration", "", "| field | value |", "|---|---|"]
    for field_name in (*_CONFIG_FIELDS, *_METHOD_FIELDS):
        if hasattr(config, field_name):
            lines.append(f"| `{field_name}` | `{getattr(config, field_name)}` |")
    for record in getattr(config, "task_records", []):
        expansion = record.get("expansion")
        if expansion:
            grown = f"{expansion.get('expanded')} of {expansion.get('layers')} layers"
            lines.append(f"| expansion of `{record['name']}` | {grown} |")
    revision = f', revision="{task}"' if task else ""
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import cmoe_adapters  # registers the method with peft",
        "from peft import PeftModel",
        "",
        f'model = PeftModel.from_pretrained(base_model, "{name}"{revision})',
        "model.generate(**inputs)                 # each sample's task is located",
        f'model.generate(**inputs, task="{tasks[-1] if tasks else "<task>"}")  # or given',
        "```",
        "",
    ]
    return "\n".join(metadata + lines)
