"""Where the library meets names that transformers has renamed between the versions it supports.

Every such seam lives here, once, so that a release that moves one breaks one function, and
`tests/test_compat.py` checks each of them (and every protected peft / transformers hook the
library overrides or calls) against the installed versions, failing loudly with what moved.

Renamed in transformers 5.x (both names are in the supported range ``>=5.0,<6``):

- ``TrainingArguments.gradient_checkpointing[_kwargs]`` became ``activation_checkpointing[_kwargs]``
  (the old names stay as deprecated aliases until v6); ``PreTrainedModel.gradient_checkpointing_enable``
  became ``activation_checkpointing_enable`` likewise.
- The key-value cache argument of ``forward`` went from ``past_key_values`` to ``cache``.
- PIL-backed image processors became ``<Name>Pil`` (the plain name now needs torchvision).
- ``Trainer.loss_is_scaled_for_ga`` appeared (before, the rule it states was implicit).

One private attribute, with no public setter: ``Trainer._train_batch_size``, the batch size the
training dataloader is built with, read once at ``__init__`` (`set_train_batch_size`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from transformers import Cache, TrainingArguments

CACHE_ARGUMENTS = frozenset({"past_key_values", "cache"})  # the KV cache's forward keyword, old and new


def _checkpointing_field() -> str:
    """``activation_checkpointing`` where transformers has it, else its older name."""
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def checkpointing_argument(enabled: bool) -> dict[str, bool]:
    """The `TrainingArguments` keyword that turns activation checkpointing on, for this transformers."""
    return {_checkpointing_field(): enabled}


def activation_checkpointing(args: TrainingArguments) -> tuple[bool, dict[str, Any]]:
    """Whether `args` asks for activation checkpointing, and with which keyword arguments."""
    field = _checkpointing_field()
    return bool(getattr(args, field, False)), dict(getattr(args, f"{field}_kwargs", None) or {})


def with_checkpointing_kwargs(args: TrainingArguments, kwargs: Mapping[str, Any]) -> TrainingArguments:
    """A shallow copy of `args` whose activation-checkpointing keyword arguments are `kwargs`."""
    field = _checkpointing_field()
    args = copy.copy(args)
    setattr(args, f"{field}_kwargs", dict(kwargs))
    if field == "activation_checkpointing" and getattr(args, "gradient_checkpointing_kwargs", None):
        args.gradient_checkpointing_kwargs = dict(kwargs)  # the deprecated alias must not disagree
    return args


def enable_activation_checkpointing(model: Any, **kwargs: Any) -> None:
    """``model.activation_checkpointing_enable(...)``, or its older name on older transformers."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def without_cache(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` without the key-value cache, whatever its keyword (a pass that must not write into it)."""
    return {
        key: value
        for key, value in kwargs.items()
        if key not in CACHE_ARGUMENTS and not isinstance(value, Cache)
    }


def loss_is_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether `Trainer.training_step` leaves `compute_loss`'s loss undivided by the accumulation steps.

    Newer transformers let a trainer say so in ``loss_is_scaled_for_ga``; without it (or when it is
    None) the rule of every 5.x release applies: the loss is already scaled when it was normalised by
    ``num_items_in_batch`` (by the model or by ``compute_loss_func``).
    """
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    accepts = trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
    return accepts or trainer.compute_loss_func is not None


def pil_image_processor_class(name: str) -> type:
    """The PIL-backed image processor `name` (e.g. ``"CLIPImageProcessor"``), which needs no torchvision.

    Newer transformers name it ``<name>Pil`` (``<name>`` itself then needs torchvision); in 5.0
    ``<name>`` is the PIL one and ``<name>Fast`` the torchvision one.
    """
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def set_train_batch_size(trainer: Any) -> None:
    """Make `trainer` build its next training dataloader with ``trainer.args.train_batch_size``.

    `Trainer` copies the batch size into ``_train_batch_size`` at ``__init__`` (5.0 also at every
    ``train()``, later releases no longer do); a task with its own batch size
    (`Task.training_args`) must update that copy, and no public call does.
    """
    if not hasattr(trainer, "_train_batch_size"):
        raise AttributeError(
            "transformers.Trainer no longer has _train_batch_size, which per-task batch sizes set: "
            "update cmoe_adapters._compat.set_train_batch_size for this transformers release."
        )
    trainer._train_batch_size = trainer.args.train_batch_size
