"""DeepSpeed ZeRO-3 between tasks: whole adapter weights where the library reads or rewrites them.

Once a task's ZeRO-3 engine is built, every parameter of the model is partitioned: each process
holds a slice and the tensor itself is empty until a forward pass gathers it. Between tasks the
library works on whole expert weights outside any forward pass (growing and consolidating
experts for the next task, CL-MoE's momentum merge, saving), so those steps gather the adapter's
parameters first. Every process runs them identically; a rewrite is broadcast from rank 0 and
re-partitioned on exit. Without ZeRO-3 (or without DeepSpeed) all of this is a no-op.

The task locator is unaffected: its state is buffers (see `densities`), which
ZeRO-3 never partitions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from ._peft import adapter_parameters

__all__ = ["adapter_parameters", "full_shape", "gathered", "is_partitioned"]


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 manages this parameter (it then carries a ``ds_id``)."""
    return hasattr(parameter, "ds_id")


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """The parameter's real shape, also while ZeRO-3 holds only a slice of it."""
    return parameter.ds_shape if is_partitioned(parameter) else parameter.shape


@contextlib.contextmanager
def gathered(parameters: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Whole tensors for `parameters` inside the block, on every process (collective under ZeRO-3).

    With ``modify=True`` the values rank 0 leaves are broadcast to all processes on exit, so an
    in-place rewrite must be computed identically everywhere (or only matter on rank 0). New
    parameters created inside the block are ordinary tensors; the next engine partitions them.
    """
    partitioned = [parameter for parameter in parameters if is_partitioned(parameter)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield
