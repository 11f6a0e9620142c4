"""A fingerprint of the base model an adapter was created on, checked when the adapter is loaded.

Experts, routers and the task locator are learnt on the base model's activations: on another base
they are meaningless, and a base of the same architecture and shapes (another seed, another
checkpoint) loads without any error from peft. The fingerprint is cheap, whatever the model size:

* ``model_type`` (the architecture) and the class of the base model;
* the shape ``out x in`` of every adapted base layer, grouped by name with layer indices as ``*``;
* a sha256 of 64 evenly spaced rows of the weight of the first and of the last adapted layer.

It is recorded when the adapter is created (`record_or_check`, from
``ContinualMoEModel.inject_adapter``) into the config's ``base_model_fingerprint``, so it is saved
in ``adapter_config.json`` where anyone can read it, and checked when a saved adapter that has
learnt tasks is injected again at load:

* another architecture or other adapted shapes: `BaseModelMismatchError`;
* the same shapes with other weights: `BaseModelMismatchWarning`, saying which weights differ: a
  quantized, merged or re-cast copy of the same base is a legitimate use (its outputs differ a
  little), another model is not. Strict loading makes this an error too.

Strictness is the loader's choice, not the saver's: whoever deploys an adapter knows whether the
base may be a quantized copy, and one saved adapter serves both uses. So it is not a config field
(which ``adapter_config.json`` would carry to every later user) but an argument of loading,
``PeftModel.from_pretrained(base, path, strict_base_check=True)`` (peft passes it to
`ContinualMoEConfig.from_pretrained`), or ``CMOE_STRICT_BASE_CHECK=1`` in the environment for
every load (``load_adapter``, the trainer, the command line).

Under DeepSpeed ZeRO-3 the base weights are partitioned (each process holds a slice): the digest
is then neither recorded nor compared; the architecture and shapes still are. Adapters saved
before fingerprints existed load as before, silently, and get the fingerprint of the base they
are loaded on.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Any

import torch
from torch import nn

from . import zero3

VERSION = 1
STRICT_ENVIRONMENT = "CMOE_STRICT_BASE_CHECK"
_STRICT_ATTRIBUTE = "_cmoe_strict_base_check"  # set on a loaded config, never saved
_SAMPLED_ROWS = 64
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


class BaseModelMismatchError(ValueError):
    """The base model is not the one the adapter was created on (architecture or adapted shapes)."""


class BaseModelMismatchWarning(UserWarning):
    """The base model has the adapter's shapes but other weights (a quantized copy, or another model)."""


def set_strict(config: Any, strict: bool | None) -> None:
    """Make loading `config`'s adapter fail (True) or warn (False) on other base weights (None: default)."""
    if strict is not None:
        setattr(config, _STRICT_ATTRIBUTE, bool(strict))


def _strict(config: Any) -> bool:
    explicit = getattr(config, _STRICT_ATTRIBUTE, None)
    if explicit is not None:
        return explicit
    return os.environ.get(STRICT_ENVIRONMENT, "").strip().lower() in {"1", "true", "yes", "on"}


def _adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, base linear) of every layer an adapter of this library holds, in module order."""
    from .experts import ContinualMoELayer

    return [
        (name, module.base_layer)
        for name, module in model.named_modules()
        if isinstance(module, ContinualMoELayer)
    ]


def _shape(layer: nn.Module) -> str:
    out_features, in_features = getattr(layer, "out_features", None), getattr(layer, "in_features", None)
    if out_features is None or in_features is None:  # not an nn.Linear-like layer
        out_features, in_features = tuple(zero3.full_shape(layer.weight))[:2]
    return f"{out_features}x{in_features}"


def _weight_digest(layer: nn.Module) -> dict[str, Any] | None:
    """dtype and sha256 of fixed rows of `layer`'s weight (None where its bytes are not here)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or zero3.is_partitioned(weight) or weight.numel() == 0:
        return None
    if weight.device.type == "meta":  # offloaded (accelerate's device map) or not materialised
        return None
    rows = torch.linspace(0, weight.shape[0] - 1, steps=min(_SAMPLED_ROWS, weight.shape[0])).round().long()
    with torch.no_grad():
        sample = weight.detach()[rows.to(weight.device)].to("cpu").contiguous()
    digest = hashlib.sha256(f"{sample.dtype}\0{tuple(weight.shape)}\0".encode())
    digest.update(sample.reshape(-1).view(torch.uint8).numpy())
    return {"dtype": str(sample.dtype).removeprefix("torch."), "sha256": digest.hexdigest()}


def compute(model: nn.Module) -> dict[str, Any]:
    """The fingerprint of the base model inside `model` (an HF model with this library's layers)."""
    layers = _adapted_layers(model)
    config = getattr(model, "config", None)
    groups: dict[str, list[str]] = {}
    for name, layer in layers:
        groups.setdefault(_INDEX.sub("*", name), []).append(_shape(layer))
    shapes = {
        group: ", ".join(f"{found.count(shape)} x {shape}" for shape in sorted(set(found)))
        for group, found in groups.items()
    }
    weights = {}
    ends = dict([layers[0], layers[-1]]) if layers else {}  # the first and the last adapted layer
    for name, layer in ends.items():
        digest = _weight_digest(layer)
        if digest is not None:
            weights[name] = digest
    return {
        "version": VERSION,
        "model_type": getattr(config, "model_type", None) or type(model).__name__,
        "model_class": type(model).__name__,
        "layers": shapes,
        "weights": weights,
    }


def record_or_check(model: nn.Module, config: Any) -> None:
    """Record the base model's fingerprint on a new adapter's config; check it on a saved one.

    Called once per injected adapter (``ContinualMoEModel.inject_adapter``). A config without a
    fingerprint (created now, or saved before fingerprints existed) or without any learnt task
    (nothing depends on the base yet) takes this base's.
    """
    current = compute(model)
    saved = getattr(config, "base_model_fingerprint", None)
    if not saved or not getattr(config, "task_records", None):
        config.base_model_fingerprint = current
        return
    check(saved, current, strict=_strict(config), created_on=getattr(config, "base_model_name_or_path", None))


def check(
    saved: dict[str, Any], current: dict[str, Any], strict: bool = False, created_on: str | None = None
):
    """Compare the fingerprint an adapter was saved with to the base model's (see the module docs)."""
    origin = f" ({created_on!r})" if created_on else ""
    if saved.get("model_type") != current["model_type"]:
        raise BaseModelMismatchError(
            f"This adapter was created on a {saved.get('model_type')!r} model ({saved.get('model_class')})"
            f"{origin}; the base model here is a {current['model_type']!r} model ({current['model_class']}). "
            "Its experts and task locator only mean something on the base they were trained on: load "
            "it onto that model."
        )
    saved_layers, layers = saved.get("layers") or {}, current["layers"]
    if saved_layers != layers:
        differences = [
            f"{group}: {saved_layers.get(group, 'none')} when saved, {layers.get(group, 'none')} here"
            for group in sorted(set(saved_layers) | set(layers))
            if saved_layers.get(group) != layers.get(group)
        ]
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise BaseModelMismatchError(
            f"The base model's adapted layers are not those this adapter was created on{origin} "
            f"(layers as 'count x out_features x in_features'): {shown}. It belongs to another base "
            "model (another size or variant of the architecture): load it onto the base it was trained on."
        )
    differing = []
    for name, digest in (saved.get("weights") or {}).items():
        here = current["weights"].get(name)
        if here is None or digest.get("sha256") is None or here["sha256"] == digest["sha256"]:
            continue  # not comparable here (ZeRO-3 partitions, offloaded weights) or identical
        if digest.get("dtype") == here["dtype"]:
            how = f"other values, both {here['dtype']}"
        else:
            how = f"{digest.get('dtype')} when saved, {here['dtype']} here"
        differing.append(f"{name}.weight ({how})")
    if not differing:
        return
    message = (
        f"The base model has the shapes of the one this adapter was created on{origin}, but other "
        f"weights: {', '.join(differing)}. A quantized, merged or re-cast (other dtype) copy of the same "
        "base model is a legitimate use (its outputs differ a little); on another model (another seed, "
        "checkpoint or fine-tune) the experts and the task locator are meaningless. "
    )
    if strict:
        raise BaseModelMismatchError(
            message + "Strict base checking is on (strict_base_check=True or CMOE_STRICT_BASE_CHECK=1)."
        )
    warnings.warn(
        message + "Load with PeftModel.from_pretrained(..., strict_base_check=True) or set "
        f"{STRICT_ENVIRONMENT}=1 to make this an error.",
        BaseModelMismatchWarning,
        stacklevel=3,
    )
