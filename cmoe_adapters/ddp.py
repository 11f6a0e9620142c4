"""Keep `DistributedDataParallel` from broadcasting the adapter's per-task buffers at every forward.

DDP broadcasts every buffer of the module it wraps from rank 0 before each forward pass
(``broadcast_buffers=True``: its default, which transformers' Trainer keeps unless
``ddp_broadcast_buffers=False``, and that would also stop the base model's own buffers). The continual-MoE
adapter keeps per-task state in buffers on purpose: the task locators' densities (`densities.TaskGaussian`,
`densities.TaskVAE`; buffers so that ZeRO-3 never partitions them) and the routers' per-task
statistics (`routing.TaskRouters`: usage shares, candidate experts). None of it changes during
training, and it is already identical on every rank -- locators are fitted on every rank from all
ranks' gathered features with the same seed, usage is all-reduced -- so the broadcast only costs
time, and its size grows with the number of tasks (megabytes per task at hidden size 4096: each
Gaussian holds a ``3 * hidden x locator_rank`` matrix).

DDP has no public switch for single buffers. It reads the private attribute
``_ddp_params_and_buffers_to_ignore`` (fully qualified names) on the module it wraps, when it is
constructed (`torch.nn.parallel.DistributedDataParallel.__init__`; its static
``_set_params_and_buffers_to_ignore_for_model`` sets the same attribute). The wrapped module is the
`PeftModel`, which forwards unknown attributes to its tuner (`model.ContinualMoEModel`), whose
property of that name returns `buffers_to_ignore`. This private seam is used here and nowhere
else; ``tests/test_ddp_buffers.py`` fails loudly when DDP stops reading the attribute.

Because DDP reads the names once, at construction, buffers of tasks added after wrapping are
broadcast again until the model is wrapped anew; `ContinualMoETrainer` wraps it anew for every task.
"""

from __future__ import annotations

from torch import nn

IGNORE_ATTRIBUTE = "_ddp_params_and_buffers_to_ignore"
"""The attribute DDP reads on the module it wraps (see the module docstring)."""

ADAPTER_MODULES = frozenset({"cmoe_locator", "cmoe_routers", "cmoe_experts"})
"""A buffer whose module path has one of these components belongs to the continual-MoE adapter."""

PEFT_ROOT = "base_model."
"""How the tuner is named inside a `PeftModel` (the module DDP usually wraps)."""


def adapter_buffer_names(tuner: nn.Module) -> list[str]:
    """Names (relative to `tuner`) of every buffer under a ``cmoe_locator``/``cmoe_routers``/
    ``cmoe_experts`` submodule, matched by module-path component (not by substring)."""
    names = []
    for name, _ in tuner.named_buffers(remove_duplicate=False):
        module_path = name.split(".")[:-1]  # the last component is the buffer's own name
        if ADAPTER_MODULES.intersection(module_path):
            names.append(name)
    return names


def buffers_to_ignore(tuner: nn.Module) -> list[str]:
    """What DDP must not broadcast, each name relative to `tuner` and to a `PeftModel` root.

    Names the wrapped HF model itself asks DDP to ignore (its own ``_ddp_params_and_buffers_to_ignore``,
    which the tuner's property would otherwise hide) are kept, relative to both roots as well.
    """
    names = adapter_buffer_names(tuner)
    base = getattr(tuner, "model", None)
    if isinstance(base, nn.Module) and IGNORE_ATTRIBUTE in vars(base):
        names += [f"model.{name}" for name in vars(base)[IGNORE_ATTRIBUTE]]
    names = list(dict.fromkeys(names))
    return names + [PEFT_ROOT + name for name in names]
