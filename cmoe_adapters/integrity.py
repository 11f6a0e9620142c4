"""Whole files: a save is written whole or not at all, and a damaged file is named, never loaded.

What is checked where (the files themselves are described in `shards`):

* ``adapter_config.json``: it parses and is a valid `ContinualMoEConfig`; it agrees with the copy
  of itself saved in the main file's manifest (`ContinualMoEConfig.from_pretrained`).
* ``adapter_model.safetensors``: it is there, its header parses (a truncated file fails here) and
  names the tensors its manifest lists (`shards.check_main_file`, called by
  `ContinualMoEConfig.from_pretrained` before peft reads the file); its data matches the digest
  of the manifest (`shards.gather`, on every load, ``load_adapter`` into an existing adapter
  included).
* ``cmoe_task-*.safetensors``: each shard matches its digest in the manifest (`shards.gather`).

Each failure raises `AdapterFileError`: which file, what is wrong with it, and how to recover (the
previous task's save folder, or another Hub revision: every finished task is pushed as a tag).
`shards.verify_adapter` runs every check on a folder or Hub revision without loading a model.

Saving goes through a staging folder (`save_atomically`): peft writes the whole adapter there,
and only once every file is complete are they moved over the previous save (renames, which need
no disk space), so a disk that fills up or a permission that is missing leaves the previous save
as it was, and says so (`AdapterSaveError`).

Three of peft's functions run before any code of this library sees the files, so they are
wrapped once, at import (`install_peft_guards`); each wrapper changes nothing for other peft
methods' adapters and re-raises peft's own error for anything that is not a cmoe_adapters save:

* ``PeftConfigMixin.from_json_file``, which parses ``adapter_config.json`` (a damaged one would
  raise a bare `json.JSONDecodeError`);
* ``PeftConfigMixin._get_peft_type``, which reads it first when loading (a missing one would only
  say "Can't find");
* ``PeftModel.save_pretrained``, which writes ``adapter_model.safetensors`` in place.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._peft import CONTINUAL_MOE

CONFIG_FILE = "adapter_config.json"  # peft's CONFIG_NAME
_STAGING_PREFIX = ".cmoe-saving-"
_PREVIOUS_PREFIX = ".cmoe-previous-"
# What a config file of this library holds, even when damaged (keys are written sorted).
_CMOE_MARKERS = (str(CONTINUAL_MOE).encode(), b'"experts_per_task"', b'"expert_compute"', b'"task_records"')
# <cache>/models--<owner>--<name>/snapshots/<commit>/<path>: where hf_hub_download puts files
_HUB_CACHE_PATH = re.compile(
    r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/"
)


class AdapterFileError(ValueError):
    """A file of a saved adapter is missing, truncated, damaged or does not match the others.

    The message names the file, says what is wrong with it and how to recover. It is a
    `ValueError`, as peft's own loading errors are.
    """


class AdapterSaveError(OSError):
    """Saving an adapter failed (disk full, permission denied, ...); the previous save is intact.

    An `OSError` with the errno of the failure when it had one (``errno.ENOSPC``, ...).
    """


# -- describing where a file is and how to recover ---------------------------------------------------


def describe(path: str) -> str:
    """A file's name for messages: a Hub file by repo and commit, a local one by its path."""
    match = _HUB_CACHE_PATH.search(path.replace(os.sep, "/"))
    if match is None:
        return path
    inner = path.replace(os.sep, "/")[match.end() :]
    repo, commit = f"{match['owner']}/{match['name']}", match["commit"][:12]
    return f"{inner} of the Hub repo {repo} (commit {commit}, cached at {path})"


def describe_source(source: Any, filename: str) -> str:
    """`filename` of a `shards.ShardSource`, for messages."""
    if os.path.isdir(source.directory):
        return os.path.join(source.directory, filename)
    name = f"{source.subfolder}/{filename}" if source.subfolder else filename
    revision = source.download_kwargs.get("revision")
    return f"{name} of the Hub repo {source.model_id}" + (f" at revision {revision!r}" if revision else "")


def recovery_hint(source: Any | None, tasks: Sequence[str] = (), filename: str | None = None) -> str:
    """How to get a sound adapter back when a file of the save in `source` is unusable.

    `tasks` are the saved adapter's tasks when known (its newest task is the broken save's),
    `filename` the broken file (a finished task's shard is the same, byte for byte, in every
    later task's save).
    """
    previous = tasks[-2] if len(tasks) >= 2 else None
    if source is None:
        return (
            "To recover, load the previous task's save (ContinualMoETrainer keeps one folder per "
            "finished task, output_dir/<task>; on the Hub each task is a revision), or save again "
            "from a model that still holds this state."
        )
    if os.path.isdir(source.directory):
        return _local_hint(os.path.abspath(source.directory), previous, filename)
    hint = f"To recover, load another revision of {source.model_id}: every finished task is pushed as a tag"
    if previous is not None:
        hint += (
            f", e.g. PeftModel.from_pretrained(base_model, {source.model_id!r}, revision={previous!r}) "
            f"(the state after task {previous!r}, without the newest task {tasks[-1]!r})"
        )
    return hint + "; or push this task again from its intact local save (trainer.push_pending())."


def _saves_next_to(directory: str) -> list[str]:
    """The other adapter folders next to `directory`, the most recently saved first."""
    parent = os.path.dirname(directory)
    found = [
        os.path.join(parent, name)
        for name in _listdir(parent)
        if not name.startswith(".") and os.path.isfile(os.path.join(parent, name, CONFIG_FILE))
    ]
    found = [path for path in found if path != directory]

    def saved_at(path: str) -> float:
        try:
            return os.path.getmtime(os.path.join(path, CONFIG_FILE))
        except OSError:
            return 0.0

    return sorted(found, key=saved_at, reverse=True)


def _local_hint(directory: str, previous: str | None, filename: str | None) -> str:
    siblings = _saves_next_to(directory)
    hints = []
    if filename is not None and filename.startswith("cmoe_task-"):
        copies = [path for path in siblings if os.path.isfile(os.path.join(path, filename))]
        if copies:
            hints.append(
                f"copy {filename} from {copies[0]} (a finished task's shard is the same file, byte for "
                "byte, in every later save)"
            )
    previous_save = os.path.join(os.path.dirname(directory), previous) if previous is not None else None
    if previous_save in siblings:
        hints.append(f"load the previous task's save {previous_save} (it lacks only the newest task)")
    elif siblings:
        hints.append(f"load another save next to it (the newest first): {', '.join(siblings[:4])}")
    else:
        hints.append(
            "load the previous task's save (ContinualMoETrainer keeps one per task: output_dir/<task>)"
        )
    interrupted = [name for name in _listdir(directory) if name.startswith(_PREVIOUS_PREFIX)]
    if interrupted:
        where = os.path.join(directory, interrupted[0])
        hints.append(f"an interrupted save left the files it replaced in {where}")
    hints.append("or save again from a model that still holds this state")
    return "To recover, " + "; ".join(hints) + "."


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def looks_like_cmoe_config(path: str) -> bool:
    """Whether the (possibly damaged) file at `path` is the config of one of this library's adapters."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(1 << 20)
    except OSError:
        return False
    return any(marker in raw for marker in _CMOE_MARKERS)


# -- saving through a staging folder ------------------------------------------------------------------


def _is_write_failure(error: BaseException) -> bool:
    """Python's, safetensors' and torch's ways of failing a write (ENOSPC, EACCES, EFBIG, ...)."""
    from safetensors import SafetensorError

    return isinstance(error, (OSError, SafetensorError, RuntimeError))


def _files_under(root: str) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, name), root) for name in names]
    return found


def _replaced_order(relative: str) -> tuple[int, str]:
    """Shards first, then the main file, the config last: the config is what loaders read first."""
    name = os.path.basename(relative)
    rank = 0 if name.startswith("cmoe_task-") else 2 if name == CONFIG_FILE else 1
    return rank, relative


def _stale_files(staging: str, directory: str, new: set[str]) -> list[str]:
    """Adapter files of the previous save that the new one does not have (old shards, the other format)."""
    from . import shards

    stale = []
    for relative in new:
        if os.path.basename(relative) != CONFIG_FILE:
            continue
        folder = os.path.dirname(relative)
        for name in _listdir(os.path.join(directory, folder)):
            candidate = os.path.join(folder, name) if folder else name
            if candidate in new or not shards.is_adapter_weights_file(name):
                continue
            if os.path.isfile(os.path.join(directory, candidate)):
                stale.append(candidate)
    return sorted(stale)


@contextlib.contextmanager
def _cleanup(*folders: str) -> Iterator[None]:
    try:
        yield
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def save_atomically(write: Callable[[str], Any], directory: str | os.PathLike) -> Any:
    """Run ``write(staging)``, then move what it wrote into `directory` over the previous save.

    Other files in `directory` (a Trainer checkpoint's optimizer state, ...) are left alone; the
    previous save's shards that the new save does not have are removed. If anything fails, every
    file of the previous save is as it was and `AdapterSaveError` says so.
    """
    directory = os.fspath(directory)
    existed = os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    for leftover in _listdir(directory):  # of a save that was killed: superseded by this one
        if leftover.startswith((_STAGING_PREFIX, _PREVIOUS_PREFIX)):
            shutil.rmtree(os.path.join(directory, leftover), ignore_errors=True)
    try:
        staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory)
    except OSError as error:
        raise _save_error(directory, error, existed) from error
    with _cleanup(staging):
        try:
            card = os.path.join(directory, "README.md")
            if os.path.isfile(card):  # peft updates an existing model card rather than replacing it
                shutil.copy2(card, os.path.join(staging, "README.md"))
            result = write(staging)
        except BaseException as error:
            if not existed:
                shutil.rmtree(directory, ignore_errors=True)
            if isinstance(error, Exception) and _is_write_failure(error):
                raise _save_error(directory, error, existed) from error
            raise
        try:
            _commit(staging, directory, existed)
        except AdapterSaveError:
            if not existed:  # there was no previous save to keep
                shutil.rmtree(directory, ignore_errors=True)
            raise
    return result


def _commit(staging: str, directory: str, existed: bool) -> None:
    """Swap the staged files in by renames; on any failure, rename the previous ones back."""
    new = set(_files_under(staging))
    replaced = sorted(new, key=_replaced_order) + _stale_files(staging, directory, new)
    try:
        backup = tempfile.mkdtemp(prefix=_PREVIOUS_PREFIX, dir=directory)
    except OSError as error:
        raise _save_error(directory, error, existed) from error
    moved: list[str] = []  # previous files, now in backup
    placed: list[str] = []  # new files, now in directory
    created: list[str] = []  # folders made for new files
    try:
        for relative in replaced:
            target = os.path.join(directory, relative)
            if os.path.lexists(target):
                os.makedirs(os.path.dirname(os.path.join(backup, relative)), exist_ok=True)
                os.replace(target, os.path.join(backup, relative))
                moved.append(relative)
            if relative in new:
                folder = os.path.dirname(target)
                if not os.path.isdir(folder):
                    os.makedirs(folder)
                    created.append(folder)
                os.replace(os.path.join(staging, relative), target)
                placed.append(relative)
    except Exception as error:
        try:
            for relative in reversed(placed):
                os.replace(os.path.join(directory, relative), os.path.join(staging, relative))
            for relative in reversed(moved):
                os.replace(os.path.join(backup, relative), os.path.join(directory, relative))
            for folder in reversed(created):
                os.rmdir(folder)
        except OSError as undo_error:
            raise AdapterSaveError(
                getattr(error, "errno", None),
                f"Saving the adapter to {directory} failed while moving the new files in "
                f"({type(error).__name__}: {error}), and putting the previous files back failed too "
                f"({undo_error}). The previous save's files are kept in {backup}: move them back into "
                f"{directory} to restore it.",
            ) from error
        shutil.rmtree(backup, ignore_errors=True)
        raise _save_error(directory, error, existed) from error
    shutil.rmtree(backup, ignore_errors=True)


def _save_error(directory: str, error: BaseException, existed: bool) -> AdapterSaveError:
    intact = (
        f"the previous save in {directory} is intact (every file as it was; it loads as before)"
        if existed
        else f"nothing was left in {directory}"
    )
    return AdapterSaveError(
        getattr(error, "errno", None),
        f"Saving the adapter to {directory} failed ({type(error).__name__}: {error}); {intact}. "
        "Free disk space or fix the permissions, then save again.",
    )


# -- wrapping peft where it touches the files first ---------------------------------------------------


def _holds_cmoe_adapter(model: Any) -> bool:
    configs = getattr(model, "peft_config", None) or {}
    return any(str(getattr(config, "peft_type", "")) == str(CONTINUAL_MOE) for config in configs.values())


def _guard_save_pretrained(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        try:
            main_process = signature.bind(self, save_directory, *args, **kwargs).arguments.get(
                "is_main_process", True
            )
        except TypeError:  # peft's own call raises the right error
            main_process = False
        if not main_process or not _holds_cmoe_adapter(self) or os.path.isfile(save_directory):
            return original(self, save_directory, *args, **kwargs)
        return save_atomically(lambda staging: original(self, staging, *args, **kwargs), save_directory)

    return save_pretrained


def _guard_from_json_file(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def from_json_file(cls: type, path_json_file: str, **kwargs: Any) -> Any:
        try:
            loaded = original(cls, path_json_file, **kwargs)
        except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
            if not looks_like_cmoe_config(path_json_file):
                raise
            problem = f"it is not valid JSON ({type(error).__name__}: {error})"
            raise AdapterFileError(_damaged_config(path_json_file, problem)) from error
        if not isinstance(loaded, dict) and looks_like_cmoe_config(path_json_file):
            raise AdapterFileError(_damaged_config(path_json_file, "it does not hold a JSON object"))
        return loaded

    return from_json_file


def _damaged_config(path: str, problem: str) -> str:
    return (
        f"{describe(path)} is damaged: {problem}. It is the config of a cmoe_adapters adapter, which peft "
        f"reads first. {recovery_hint(_source_of(path))}"
    )


def _source_of(path: str) -> Any:
    """The `shards.ShardSource` that holds the file at `path` (a local folder or a Hub repo)."""
    from . import shards

    match = _HUB_CACHE_PATH.search(path.replace(os.sep, "/"))
    if match is None:
        return shards.ShardSource(os.path.dirname(os.path.abspath(path)))
    return shards.ShardSource(f"{match['owner']}/{match['name']}", None, {"revision": match["commit"]})


def _guard_get_peft_type(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _get_peft_type(cls: type, model_id: str, **hf_hub_download_kwargs: Any) -> Any:
        try:
            return original(cls, model_id, **hf_hub_download_kwargs)
        except ValueError as error:
            if isinstance(error, AdapterFileError):
                raise
            missing = _missing_config(os.fspath(model_id), hf_hub_download_kwargs)
            if missing is None:
                raise
            raise AdapterFileError(missing) from error

    return _get_peft_type


def _missing_config(model_id: str, download_kwargs: dict[str, Any]) -> str | None:
    """The message for a cmoe_adapters save without its ``adapter_config.json`` (None: not one)."""
    from . import shards

    accepted = {"revision", "token", "cache_dir"}
    kept = {key: value for key, value in download_kwargs.items() if key in accepted and value}
    source = shards.ShardSource(model_id, download_kwargs.get("subfolder"), kept)
    if os.path.isdir(source.directory):  # a local save
        if os.path.isfile(os.path.join(source.directory, CONFIG_FILE)):
            return None  # there, but unreadable: peft's own error says why
        if not shards.holds_cmoe_weights(source.directory):
            return None
    elif os.path.exists(model_id):
        return None  # a local path without such a subfolder: peft's error says so
    else:  # a Hub repo
        try:
            path = source.fetch(shards.MAIN_FILE)
        except Exception:  # no such repo or revision, no access, no network: peft's error stands
            return None
        if path is None or not shards.is_cmoe_main_file(path):
            return None
    return (
        f"{describe_source(source, CONFIG_FILE)} is missing: it holds the weights of a cmoe_adapters "
        f"adapter but not its config, so this save is incomplete. {recovery_hint(source)}"
    )


_GUARDED = "__cmoe_guarded__"


def install_peft_guards() -> None:
    """Wrap the three peft functions above (once; idempotent)."""
    from peft import PeftModel
    from peft.config import PeftConfigMixin

    for cls, name, guard in (
        (PeftConfigMixin, "from_json_file", _guard_from_json_file),
        (PeftConfigMixin, "_get_peft_type", _guard_get_peft_type),
        (PeftModel, "save_pretrained", _guard_save_pretrained),
    ):
        owner = next(klass for klass in cls.__mro__ if name in klass.__dict__)  # where peft defines it
        current = owner.__dict__[name]
        is_classmethod = isinstance(current, classmethod)
        function = current.__func__ if is_classmethod else current
        if getattr(function, _GUARDED, False):
            continue
        guarded = guard(function)
        setattr(guarded, _GUARDED, True)
        setattr(owner, name, classmethod(guarded) if is_classmethod else guarded)
