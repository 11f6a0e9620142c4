"""Per-task shard files: what a finished task froze is saved once, in a file whose bytes never change.

Layout of a saved adapter with tasks ``t_0 ... t_n`` (``n >= 1``)::

    adapter_config.json
    adapter_model.safetensors            the newest task t_n (its routers, its new experts' rows, its
                                         locator VAE), everything that can still change (all experts
                                         when freeze_old_experts=False, a shared router,
                                         modules_to_save, ...), and a manifest of the shards
    cmoe_task-000-<t_0>.safetensors      what t_0 froze: its routers, usage and task gate, its locator
    ...                                  VAE, and its experts' rows (only when old experts are frozen)
    cmoe_task-<n-1>-<t_(n-1)>.safetensors

Every later save writes a finished task's shard from the same tensors, so with the same bytes
(safetensors orders tensors by dtype and name; the only metadata is ``{"format": "pt"}``, as a
single key, because safetensors writes several keys in a random order). The Hub client skips files
whose blob id did not change, so a push uploads the main file, the one new shard of the task that
just became old, the config and the model card -- whatever the number of tasks. A one-task adapter,
and a pickle save (``safe_serialization=False``), keep peft's single file; single-file adapters
(also those of earlier versions) load as before.

The live model consolidates the experts of all older tasks into one block per layer, so expert
rows are cut per task on saving (``<layer>.cmoe_experts.lora_A.by_task.<t>``) and re-cut into the
loading model's blocks on loading.

Why these hooks (peft 0.21):

* **Saving.** `PeftModel.save_pretrained` gives the tuner no say about files: it writes the whole
  `get_peft_model_state_dict` into ``adapter_model.safetensors``, then calls the adapter config's
  ``save_pretrained(output_dir, auto_mapping_dict=...)`` on the same directory -- the only call that
  gets the directory after the weights are written. So `ContinualMoEConfig.save_pretrained`, when
  called that way, splits the file peft just wrote (`write_layout`). Answering a smaller state dict
  from the tuner's ``_get_adapter_state_dict`` instead would also shrink it for every in-memory user
  (Trainer/DeepSpeed/FSDP state dicts, user code), which must keep the full state. Every way this
  step can fail leaves peft's complete single file, which loads.
* **Loading.** `PeftModel.load_adapter` reads only ``adapter_model.safetensors``, then
  `set_peft_model_state_dict` passes the state dict, the model and the adapter's config to the
  tuner's ``_remap_adapter_state_dict_for_load`` before ``load_state_dict``: `ContinualMoEModel`
  adds the shards there (`gather`). They are found through the config:
  `ContinualMoEConfig.from_pretrained`, which `PeftModel.from_pretrained` and ``load_adapter`` (for
  a new adapter name) call with the path or repo id and the download arguments (revision,
  subfolder, token, cache_dir, ...), remembers them on the config object (never in
  ``adapter_config.json``); the shards are read from the same directory, or downloaded from the
  same repo and revision with `huggingface_hub.hf_hub_download`.
* **Integrity** (see `integrity`). The manifest holds each shard's digest (sha256 over its
  tensors' names, dtypes, shapes and bytes), two digests of the main file's own tensors (of their
  names and shapes, checked on the header before peft reads the file; of their dtypes, shapes and
  bytes whatever their names, checked on what peft read) and a copy of ``adapter_config.json``.
  Every safetensors save has a manifest, a one-task adapter's too (with no shards). A shard is used
  only if its digest matches, and a shard whose tensors the model already holds needs no file at
  all: that covers ``load_adapter`` into an adapter that already exists (the Trainer resuming a
  checkpoint), whose config may not know where the files are. A file that is missing, truncated
  or damaged raises `integrity.AdapterFileError`, naming it and saying how to recover; a wrong
  file never loads silently. Files saved before a manifest entry existed are checked as far as
  their manifest goes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import integrity
from .integrity import AdapterFileError

MAIN_FILE = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
PICKLE_FILE = "adapter_model.bin"  # peft's WEIGHTS_NAME (safe_serialization=False: not verified)
MANIFEST_KEY = "base_model.cmoe_shards"  # a uint8 tensor holding the manifest as JSON
SHARD_GLOB = "cmoe_task-*.safetensors"
LAYOUT_VERSION = 1
_SOURCE_ATTRIBUTE = "_cmoe_shard_source"
_CHECKED_ATTRIBUTE = "_cmoe_checked_main"  # the source's main file, checked for the load that follows
_METADATA = {"format": "pt"}  # one key only: safetensors writes several in a random order
# Keys of adapter_config.json that peft rewrites or a user may set without changing the adapter.
CONFIG_COPY_IGNORED = frozenset(
    {"auto_mapping", "base_model_name_or_path", "inference_mode", "peft_version", "revision"}
)

_SHARD_FILE = re.compile(r"^cmoe_task-\d+-.+\.safetensors$")
_EXPERT_BLOCK = re.compile(r"^(?P<layer>.+)\.cmoe_experts\.lora_(?P<ab>[AB])\.(?P<block>\d+)$")
_EXPERT_ROWS = re.compile(r"^(?P<layer>.+)\.cmoe_experts\.lora_(?P<ab>[AB])\.by_task\.(?P<task>\d+)$")
_ROUTER = re.compile(r"\.cmoe_routers\.(?P<kind>weight|task_logits|usage|expert_index)\.(?P<task>\d+)$")
_LOCATOR = re.compile(r"(?:^|\.)cmoe_locator\.(?:vaes|gaussians)\.(?P<task>\d+)\.")
_PEFT_PREFIX = "base_model.model."

Tensors = dict[str, torch.Tensor]
Hint = Callable[[], str]  # how to recover, worked out only when a file is found broken


class LayoutMismatch(ValueError):
    """The tensors do not have the structure the config describes (so they are not split)."""


def shard_filename(index: int, name: str) -> str:
    """``cmoe_task-<index>-<name>.safetensors`` (task names are valid file names, see config.py)."""
    return f"cmoe_task-{index:03d}-{name}.safetensors"


def is_adapter_weights_file(name: str) -> bool:
    """Whether `name` is one of the weight files of a saved adapter (main file, pickle or shard)."""
    return name in (MAIN_FILE, PICKLE_FILE) or bool(_SHARD_FILE.match(name))


def is_cmoe_main_file(path: str) -> bool:
    """Whether `path` is a main file with a manifest (a save of this library), read from its header."""
    try:
        with safe_open(path, framework="pt") as handle:
            names = handle.keys()
    except (OSError, SafetensorError):
        return False
    return MANIFEST_KEY in names


def holds_cmoe_weights(directory: str) -> bool:
    """Whether `directory` holds the weight files of a save of this library."""
    if any(_SHARD_FILE.match(name) for name in os.listdir(directory)):
        return True
    return is_cmoe_main_file(os.path.join(directory, MAIN_FILE))


def _raw_bytes(tensor: torch.Tensor) -> Any:
    """The bytes of `tensor` as a buffer (no copy for a contiguous CPU tensor)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def names_digest(shapes: dict[str, Any]) -> str:
    """sha256 over sorted tensor names and shapes: what a safetensors header says, read without the data."""
    digest = hashlib.sha256()
    for key in sorted(shapes):
        digest.update(f"{key}\0{tuple(shapes[key])}\0".encode())
    return digest.hexdigest()


def data_digest(tensors: Any) -> str | None:
    """sha256 over the dtypes, shapes and bytes of `tensors`, whatever their names and order.

    peft may rename keys before the tuner sees them (``modules_to_save``, checkpoint conversion
    mappings), so the main file's data is checked by content only; its names are checked on the
    file's header (`names_digest`). None for meta tensors.
    """
    parts = []
    for tensor in tensors:
        if tensor.device.type == "meta":
            return None
        part = hashlib.sha256(f"{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        part.update(_raw_bytes(tensor))
        parts.append(part.hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()


def tensor_digest(tensors: Tensors) -> str | None:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (None for meta tensors)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        if tensor.device.type == "meta":
            return None
        tensor = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensors[key].shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- which task owns a tensor -----------------------------------------------------------------------


def split_by_task(state_dict: Tensors, config: Any) -> tuple[Tensors, dict[int, Tensors]]:
    """``(main, {task index: frozen tensors})`` of a checkpoint state dict (keys without adapter name).

    A tensor goes to the shard of task ``t`` only if nothing can change it once ``t`` is finished:
    router ``t`` (unless one router is shared), its usage statistics and task gate, locator VAE ``t``
    and, when old experts are frozen, the expert rows ``t`` created. Tensors of the newest task, and
    everything else, stay in ``main``. Raises `LayoutMismatch` if the expert rows do not add up to
    what the config's task records describe.
    """
    tasks = len(config.task_records)
    if tasks < 2:
        return dict(state_dict), {}
    newest = tasks - 1
    main: Tensors = {}
    frozen: dict[int, Tensors] = defaultdict(dict)
    blocks: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)

    def place(key: str, tensor: torch.Tensor, owner: int | None) -> None:
        if owner is not None and owner >= tasks:
            raise LayoutMismatch(f"{key} belongs to task {owner}, but the config has {tasks} tasks.")
        if owner is None or owner == newest:
            main[key] = tensor
        else:
            frozen[owner][key] = tensor

    for key, tensor in state_dict.items():
        if (match := _EXPERT_BLOCK.match(key)) and config.freeze_old_experts:
            blocks[(match["layer"], match["ab"])][int(match["block"])] = tensor
        elif match := _ROUTER.search(key):
            shared = match["kind"] == "weight" and not config.router_per_task
            place(key, tensor, None if shared else int(match["task"]))
        elif match := _LOCATOR.search(key):
            place(key, tensor, int(match["task"]))
        else:
            place(key, tensor, None)

    for (layer, ab), parts in blocks.items():
        stacked = torch.cat([parts[index] for index in sorted(parts)])
        layer_name = layer.removeprefix(_PEFT_PREFIX)
        rows = [config.new_experts_for(task, layer_name) * config.r for task in range(tasks)]
        if sum(rows) != stacked.shape[0]:
            raise LayoutMismatch(
                f"{layer} holds {stacked.shape[0]} rows of lora_{ab}; the task records describe {sum(rows)}."
            )
        for task, piece in enumerate(stacked.split(rows)):
            if piece.shape[0]:
                place(f"{layer}.cmoe_experts.lora_{ab}.by_task.{task}", piece.clone(), task)
    return main, dict(frozen)


# -- saving ------------------------------------------------------------------------------------------


def _write(path: str, tensors: Tensors) -> None:
    """Write `tensors` to `path` atomically, with deterministic bytes."""
    temporary = f"{path}.tmp-{os.getpid()}"
    contiguous = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    try:
        save_file(contiguous, temporary, metadata=_METADATA)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _main_entry(main: Tensors) -> dict[str, Any]:
    """The manifest's record of the main file's own tensors (all but the manifest)."""
    shapes = {key: tuple(value.shape) for key, value in main.items()}
    return {"tensors": len(main), "names": names_digest(shapes), "data": data_digest(main.values())}


def _config_copy(directory: str) -> dict[str, Any] | None:
    """``adapter_config.json`` as just written to `directory`, without the keys peft rewrites."""
    try:
        with open(os.path.join(directory, integrity.CONFIG_FILE), encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return None
    return {key: value for key, value in saved.items() if key not in CONFIG_COPY_IGNORED}


def _encode_manifest(entries: list[dict[str, Any]], main: dict[str, Any], config: dict[str, Any] | None):
    manifest: dict[str, Any] = {"layout": LAYOUT_VERSION, "shards": entries, "main": main}
    if config is not None:
        manifest["config"] = config
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def _no_hint() -> str:
    return ""


def _decode_manifest(tensor: torch.Tensor, label: str = MAIN_FILE, hint: Hint = _no_hint) -> dict[str, Any]:
    try:
        manifest = json.loads(bytes(tensor.to("cpu", torch.uint8).tolist()).decode())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("not a manifest")
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise AdapterFileError(
            f"{label} is damaged: the manifest of the saved tasks in it ({MANIFEST_KEY}) is unreadable "
            f"({error}). {hint()}".rstrip()
        ) from error
    if manifest.get("layout", 0) > LAYOUT_VERSION:
        raise ValueError(
            f"This adapter was saved with shard layout {manifest.get('layout')}; this version of "
            f"cmoe_adapters reads up to layout {LAYOUT_VERSION}. Upgrade cmoe_adapters to load it."
        )
    return manifest


def read_manifest(path: str) -> dict[str, Any] | None:
    """The manifest of the main file at `path` (None for a file without one)."""
    with safe_open(path, framework="pt") as handle:
        names = handle.keys()
        tensor = handle.get_tensor(MANIFEST_KEY) if MANIFEST_KEY in names else None
    return None if tensor is None else _decode_manifest(tensor, path)


def _empty_with_metadata(path: str) -> bool:
    """Whether `path` is an empty state dict with metadata as safetensors < 0.4.4 writes it.

    Those versions write its header as ``{},"__metadata__":{...}}``, which they cannot parse.
    """
    with open(path, "rb") as handle:
        return handle.read(11)[8:] == b"{},"


def write_layout(directory: str, config: Any) -> list[str]:
    """Split the ``adapter_model.safetensors`` peft just wrote in `directory` into main file + shards.

    Removes shard files of an earlier save that this state does not use, and adds the manifest
    (also to a one-task file, and to a file that does not match `config`, which stays whole with a
    warning). Returns the shard file names. Leaves a pickle save or an already split file as it is.
    """
    path = os.path.join(directory, MAIN_FILE)
    if not os.path.isfile(path):
        return []
    try:
        with safe_open(path, framework="pt") as handle:
            names = handle.keys()
    except SafetensorError:
        if not _empty_with_metadata(path):
            raise
        names = []  # an adapter without tasks, written by safetensors < 0.4.4 (it cannot read it back)
    if MANIFEST_KEY in names:
        return []
    state = load_file(path) if names else {}
    try:
        main, frozen = split_by_task(state, config)
    except LayoutMismatch as error:
        warnings.warn(f"Saved {path} as a single file (not split per task): {error}", stacklevel=3)
        main, frozen = state, {}
    entries = []
    names = config.task_names
    for index in sorted(frozen):
        filename = shard_filename(index, names[index])
        _write(os.path.join(directory, filename), frozen[index])
        entries.append(
            {"index": index, "task": names[index], "file": filename, "digest": tensor_digest(frozen[index])}
        )
    used = {entry["file"] for entry in entries}
    for stale in os.listdir(directory):
        if _SHARD_FILE.match(stale) and stale not in used:
            os.remove(os.path.join(directory, stale))
    record = _main_entry(main)
    main[MANIFEST_KEY] = _encode_manifest(entries, record, _config_copy(directory))
    _write(path, main)
    return sorted(used)


# -- where a loaded adapter came from ----------------------------------------------------------------


@dataclass
class ShardSource:
    """A local directory or a Hub repo (with its download arguments) that holds an adapter's shards."""

    model_id: str
    subfolder: str | None = None
    download_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold a token

    @property
    def directory(self) -> str:
        return os.path.join(self.model_id, self.subfolder) if self.subfolder else self.model_id

    def fetch(self, filename: str) -> str | None:
        """Local path of `filename` (downloaded if needed); None if the source does not have it."""
        if os.path.isdir(self.directory):
            path = os.path.join(self.directory, filename)
            return path if os.path.isfile(path) else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(self.model_id, filename, subfolder=self.subfolder, **self.download_kwargs)
        except EntryNotFoundError:
            return None


def source_for(model_id: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> ShardSource:
    """The `ShardSource` of `model_id` with the download arguments among `kwargs`."""
    from huggingface_hub import hf_hub_download

    accepted = set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename", "subfolder"}
    download = {key: value for key, value in kwargs.items() if key in accepted and value is not None}
    return ShardSource(os.fspath(model_id), subfolder, download)


def remember_source(config: Any, model_id: str | os.PathLike, subfolder: str | None = None, **kwargs: Any):
    """Record on `config` where its adapter was loaded from (the download arguments among `kwargs`).

    `ContinualMoEConfig.from_pretrained` does this; call it yourself before
    ``load_adapter(model_id, adapter_name=<an existing adapter>)`` when that adapter's shards are
    not what the model holds already (e.g. after `ContinualMoEModel.replay_tasks`).
    """
    setattr(config, _SOURCE_ATTRIBUTE, source_for(model_id, subfolder, **kwargs))


def source_of(config: Any) -> ShardSource | None:
    """Where `config`'s adapter was loaded from (None if the config does not know)."""
    return getattr(config, _SOURCE_ATTRIBUTE, None)


# -- verifying ---------------------------------------------------------------------------------------


def _safetensors_problem(error: Exception) -> str:
    text = str(error)
    if "incomplete metadata" in text or "MetadataIncompleteBuffer" in text:  # newer / older safetensors
        what = "it is truncated: shorter than its header says"
    elif "too small" in text or "header length" in text:
        what = "it is truncated or empty: it has no complete header"
    else:
        what = "its header is corrupt"
    return f"{what} (safetensors: {text})"


def check_main_file(config: Any) -> dict[str, Any] | None:
    """Check the main file of `config`'s source on its header alone; returns its manifest.

    Raises `AdapterFileError` if the file is missing, truncated or its header damaged (before
    peft reads it, whose own error would not say which file or what to do). None for a pickle
    save, a single-file adapter of an earlier version, or a config that does not know its source.
    """
    source = source_of(config)
    if source is None:
        return None
    label = integrity.describe_source(source, MAIN_FILE)
    hint = functools.partial(integrity.recovery_hint, source, config.task_names)
    path = source.fetch(MAIN_FILE)
    if path is None:
        if source.fetch(PICKLE_FILE) is not None:  # a pickle carries no digest: say it is unchecked
            warnings.warn(
                f"{integrity.describe_source(source, PICKLE_FILE)} is a pickle save "
                "(safe_serialization=False): it holds no digest, so damage to it cannot be found. Save "
                "with safetensors (the default) to have every file checked when it loads.",
                UserWarning,
                stacklevel=2,
            )
            return None
        raise AdapterFileError(
            f"{label} is missing: {integrity.CONFIG_FILE} is there, but not the weights of the newest "
            f"task saved with it, so this save is incomplete. {hint()}"
        )
    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {key: handle.get_slice(key).get_shape() for key in keys if key != MANIFEST_KEY}
            manifest_tensor = handle.get_tensor(MANIFEST_KEY) if MANIFEST_KEY in keys else None
    except SafetensorError as error:
        raise AdapterFileError(f"{label} is damaged: {_safetensors_problem(error)}. {hint()}") from error
    if manifest_tensor is None:
        return None
    manifest = _decode_manifest(manifest_tensor, label, hint)
    main = manifest.get("main")
    if main is not None and (len(shapes) != main["tensors"] or names_digest(shapes) != main["names"]):
        raise AdapterFileError(
            f"{label} is damaged: its header does not list the tensors saved in it (their names or shapes "
            f"changed; {len(shapes)} listed, {main['tensors']} saved). {hint()}"
        )
    setattr(config, _CHECKED_ATTRIBUTE, main)
    return manifest


def _check_main_data(state_dict: Tensors, manifest: dict[str, Any], label: str, hint: Hint) -> None:
    main = manifest.get("main")
    if main is None or main.get("data") is None:
        return  # saved before the main file had a digest
    if len(state_dict) != main["tensors"] or data_digest(state_dict.values()) != main["data"]:
        raise AdapterFileError(
            f"{label} is damaged: the bytes of its tensors are not those saved in it (they do not match "
            f"the digest in its manifest). {hint()}"
        )


def verify_adapter(model_id: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> Any:
    """Check every file of a saved adapter (a folder or a Hub repo) without loading a model.

    Reads ``adapter_config.json``, ``adapter_model.safetensors`` and every shard in full and
    checks them against each other (`kwargs`: the download arguments, e.g. ``revision``).
    Returns the adapter's `ContinualMoEConfig`; raises `AdapterFileError` naming the first file
    that is missing, truncated or damaged. Run it before ``load_adapter`` into an existing adapter,
    which reads the main file with peft before any check of this library.
    """
    from .config import ContinualMoEConfig

    config = ContinualMoEConfig.from_pretrained(os.fspath(model_id), subfolder=subfolder, **kwargs)
    manifest = check_main_file(config)
    source = source_of(config)
    if manifest is None or source is None:
        return config
    label = integrity.describe_source(source, MAIN_FILE)
    hint = functools.partial(integrity.recovery_hint, source, config.task_names)
    path = source.fetch(MAIN_FILE)
    state = load_file(path) if path is not None else {}
    state.pop(MANIFEST_KEY, None)
    _check_main_data(state, manifest, label, hint)
    for entry in manifest["shards"]:
        _read_shard(source, entry, torch.device("cpu"), config.task_names)
    return config


# -- loading -----------------------------------------------------------------------------------------


def _current_state(model: torch.nn.Module, adapter_name: str) -> Tensors:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)


def _join_expert_rows(state_dict: Tensors, current: Tensors) -> None:
    """Replace per-task expert rows by the blocks of the loading model (in place)."""
    rows: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for key in [key for key in state_dict if ".by_task." in key]:
        if match := _EXPERT_ROWS.match(key):
            rows[(match["layer"], match["ab"])][int(match["task"])] = state_dict.pop(key)
    if not rows:
        return
    block_rows: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for key, tensor in current.items():
        if match := _EXPERT_BLOCK.match(key):
            block_rows[(match["layer"], match["ab"])][int(match["block"])] = tensor.shape[0]
    for (layer, ab), pieces in rows.items():
        device = pieces[max(pieces)].device
        stacked = torch.cat([pieces[task].to(device) for task in sorted(pieces)])
        blocks = block_rows.get((layer, ab), {})
        sizes = [blocks[index] for index in sorted(blocks)]
        if sum(sizes) != stacked.shape[0]:
            raise ValueError(
                f"The saved adapter has {stacked.shape[0]} rows of lora_{ab} in {layer}, the model "
                f"{sum(sizes)}: the adapter's task structure does not match the saved one."
            )
        for index, part in zip(sorted(blocks), stacked.split(sizes), strict=True):
            key = f"{layer}.cmoe_experts.lora_{ab}.{index}"
            if key in state_dict:
                raise ValueError(f"The saved adapter holds {key} twice (as a block and as per-task rows).")
            state_dict[key] = part


def gather(model: torch.nn.Module, config: Any, adapter_name: str, state_dict: Tensors) -> Tensors:
    """The full checkpoint state dict: the main file's tensors plus every shard its manifest names."""
    state_dict = dict(state_dict)
    manifest_tensor = state_dict.pop(MANIFEST_KEY, None)
    if manifest_tensor is None:
        return state_dict  # a single-file adapter of an earlier version, or a pickle save
    source: ShardSource | None = source_of(config)
    label = f"The {MAIN_FILE} being loaded into the adapter {adapter_name!r}"
    hint = functools.partial(integrity.recovery_hint, None, config.task_names)
    manifest = _decode_manifest(manifest_tensor, label, hint)
    checked = config.__dict__.pop(_CHECKED_ATTRIBUTE, None)  # once: set for the load that follows it
    if source is not None and checked is not None and manifest.get("main") == checked:
        # the file from_pretrained just checked (not, e.g., a Trainer checkpoint loaded into the adapter)
        label = integrity.describe_source(source, MAIN_FILE)
        hint = functools.partial(integrity.recovery_hint, source, config.task_names)
    _check_main_data(state_dict, manifest, label, hint)
    current = _current_state(model, adapter_name)
    try:
        _, held = split_by_task(current, config)
    except LayoutMismatch:
        held = {}
    device = next(iter(state_dict.values())).device if state_dict else torch.device("cpu")
    names = config.task_names
    for entry in manifest["shards"]:
        index, task, filename = entry["index"], entry["task"], entry["file"]
        if index >= len(names) or names[index] != task:
            raise ValueError(
                f"The saved adapter's task {index} is {task!r}, this adapter's tasks are {names}: load it "
                "under a new adapter name (load_adapter(..., adapter_name=...)) or with "
                "PeftModel.from_pretrained."
            )
        tensors = held.get(index)
        if tensors is None or tensor_digest(tensors) != entry["digest"]:
            tensors = _read_shard(source, entry, device, names)
        for key, value in tensors.items():
            if key in state_dict:
                raise ValueError(f"{key} is both in {MAIN_FILE} and in {filename}.")
            state_dict[key] = value
    _join_expert_rows(state_dict, current)
    return state_dict


def _read_shard(
    source: ShardSource | None, entry: dict[str, Any], device: torch.device, tasks: list[str]
) -> Tensors:
    """The tensors of a finished task's shard, checked against the manifest's digest."""
    filename, task = entry["file"], entry["task"]
    if source is None:
        raise ValueError(
            f"The finished task {task!r} of this adapter is saved in {filename}, next to {MAIN_FILE} (which "
            "holds only the newest task), but this adapter's config does not say where the adapter was "
            "loaded from. Load the saved folder or Hub repo with "
            "PeftModel.from_pretrained(base_model, path_or_repo_id, revision=...) or "
            "model.load_adapter(path_or_repo_id, adapter_name='<a new name>', revision=...); to load into an "
            "existing adapter, call cmoe_adapters.shards.remember_source(model.peft_config[name], "
            "path_or_repo_id, revision=...) first."
        )
    label = integrity.describe_source(source, filename)
    path = source.fetch(filename)
    if path is None:
        raise AdapterFileError(
            f"{label} is missing: it holds the finished task {task!r} of this adapter ({MAIN_FILE} holds "
            "only the newest task), so this save is incomplete. If the adapter was moved, load it from where "
            f"it is now (cmoe_adapters.shards.remember_source tells an existing adapter). "
            f"{integrity.recovery_hint(source, tasks, filename)}"
        )
    try:
        tensors = load_file(path, device=str(device))
    except SafetensorError as error:
        problem = _safetensors_problem(error)
        hint = integrity.recovery_hint(source, tasks, filename)
        raise AdapterFileError(f"{label} is damaged: {problem}. {hint}") from error
    if tensor_digest(tensors) != entry["digest"]:
        raise AdapterFileError(
            f"{label} is damaged: the shard of the finished task {task!r} holds other tensors than the saved "
            f"adapter's manifest says. {integrity.recovery_hint(source, tasks, filename)}"
        )
    return tensors
