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
* **Integrity.** The manifest holds each shard's digest (sha256 over its tensors' names, dtypes,
  shapes and bytes). A shard is used only if its digest matches, and a shard whose tensors the
  model already holds needs no file at all: that covers ``load_adapter`` into an adapter that
  already exists (the Trainer resuming a checkpoint), whose config may not know where the files
  are. Anything else fails with a message saying what to do; a wrong shard never loads silently.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MAIN_FILE = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
MANIFEST_KEY = "base_model.cmoe_shards"  # a uint8 tensor holding the manifest as JSON
SHARD_GLOB = "cmoe_task-*.safetensors"
LAYOUT_VERSION = 1
_SOURCE_ATTRIBUTE = "_cmoe_shard_source"
_METADATA = {"format": "pt"}  # one key only: safetensors writes several in a random order

_SHARD_FILE = re.compile(r"^cmoe_task-\d+-.+\.safetensors$")
_EXPERT_BLOCK = re.compile(r"^(?P<layer>.+)\.cmoe_experts\.lora_(?P<ab>[AB])\.(?P<block>\d+)$")
_EXPERT_ROWS = re.compile(r"^(?P<layer>.+)\.cmoe_experts\.lora_(?P<ab>[AB])\.by_task\.(?P<task>\d+)$")
_ROUTER = re.compile(r"\.cmoe_routers\.(?P<kind>weight|task_logits|usage|expert_index)\.(?P<task>\d+)$")
_LOCATOR = re.compile(r"(?:^|\.)cmoe_locator\.(?:vaes|gaussians)\.(?P<task>\d+)\.")
_PEFT_PREFIX = "base_model.model."

Tensors = dict[str, torch.Tensor]


class LayoutMismatch(ValueError):
    """The tensors do not have the structure the config describes (so they are not split)."""


def shard_filename(index: int, name: str) -> str:
    """``cmoe_task-<index>-<name>.safetensors`` (task names are valid file names, see config.py)."""
    return f"cmoe_task-{index:03d}-{name}.safetensors"


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
    save_file(contiguous, temporary, metadata=_METADATA)
    os.replace(temporary, path)


def _encode_manifest(entries: list[dict[str, Any]]) -> torch.Tensor:
    text = json.dumps({"layout": LAYOUT_VERSION, "shards": entries}, sort_keys=True, separators=(",", ":"))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def _decode_manifest(tensor: torch.Tensor) -> dict[str, Any]:
    manifest = json.loads(bytes(tensor.to("cpu", torch.uint8).tolist()).decode())
    if manifest.get("layout", 0) > LAYOUT_VERSION:
        raise ValueError(
            f"This adapter was saved with shard layout {manifest.get('layout')}; this version of "
            f"cmoe_adapters reads up to layout {LAYOUT_VERSION}. Upgrade cmoe_adapters to load it."
        )
    return manifest


def write_layout(directory: str, config: Any) -> list[str]:
    """Split the ``adapter_model.safetensors`` peft just wrote in `directory` into main file + shards.

    Removes shard files of an earlier save that this state does not use. Returns the shard file
    names. Leaves a pickle save, an already split file, or a file that does not match `config`
    (with a warning) as it is.
    """
    path = os.path.join(directory, MAIN_FILE)
    if not os.path.isfile(path):
        return []
    with safe_open(path, framework="pt") as handle:
        names = handle.keys()
    if MANIFEST_KEY in names:
        return []
    try:
        main, frozen = split_by_task(load_file(path), config)
    except LayoutMismatch as error:
        warnings.warn(f"Saved {path} as a single file (not split per task): {error}", stacklevel=3)
        return []
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
    if entries:
        main[MANIFEST_KEY] = _encode_manifest(entries)
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


def remember_source(config: Any, model_id: str | os.PathLike, subfolder: str | None = None, **kwargs: Any):
    """Record on `config` where its adapter was loaded from (the download arguments among `kwargs`).

    `ContinualMoEConfig.from_pretrained` does this; call it yourself before
    ``load_adapter(model_id, adapter_name=<an existing adapter>)`` when that adapter's shards are
    not what the model holds already (e.g. after `ContinualMoEModel.replay_tasks`).
    """
    from huggingface_hub import hf_hub_download

    accepted = set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename", "subfolder"}
    download = {key: value for key, value in kwargs.items() if key in accepted and value is not None}
    setattr(config, _SOURCE_ATTRIBUTE, ShardSource(os.fspath(model_id), subfolder, download))


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
        return state_dict  # a single-file adapter
    manifest = _decode_manifest(manifest_tensor)
    current = _current_state(model, adapter_name)
    try:
        _, held = split_by_task(current, config)
    except LayoutMismatch:
        held = {}
    source: ShardSource | None = getattr(config, _SOURCE_ATTRIBUTE, None)
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
            tensors = _read_shard(source, entry, device)
        for key, value in tensors.items():
            if key in state_dict:
                raise ValueError(f"{key} is both in {MAIN_FILE} and in {filename}.")
            state_dict[key] = value
    _join_expert_rows(state_dict, current)
    return state_dict


def _read_shard(source: ShardSource | None, entry: dict[str, Any], device: torch.device) -> Tensors:
    filename, task = entry["file"], entry["task"]
    if source is None:
        problem = "this adapter's config does not say where the adapter was loaded from"
    else:
        path = source.fetch(filename)
        if path is None:
            problem = f"{source.directory} has no such file"
            if source.download_kwargs.get("revision"):
                problem += f" at revision {source.download_kwargs['revision']!r}"
        else:
            tensors = load_file(path, device=str(device))
            if tensor_digest(tensors) == entry["digest"]:
                return tensors
            problem = f"{path} holds other tensors than the saved adapter's manifest says"
    raise ValueError(
        f"The finished task {task!r} of this adapter is saved in {filename}, next to {MAIN_FILE} (which "
        f"holds only the newest task), but {problem}. Load the saved folder or Hub repo with "
        "PeftModel.from_pretrained(base_model, path_or_repo_id, revision=...) or "
        "model.load_adapter(path_or_repo_id, adapter_name='<a new name>', revision=...); to load into an "
        "existing adapter, call cmoe_adapters.shards.remember_source(model.peft_config[name], "
        "path_or_repo_id, revision=...) first."
    )
