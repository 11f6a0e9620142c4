"""What DDP broadcasts at a forward pass of a continual-MoE model with 1 and with 4 tasks.

torchrun --nproc_per_node 2 ddp_buffers.py DUMP_DIR

Every rank builds the same tiny model, adds the tasks and fits their locators (identical data and
seeds on both ranks), then wraps it in `DistributedDataParallel` (gloo, CPU). After wrapping, rank 1
overwrites every buffer with a sentinel (NaN, flipped booleans, -1); a forward pre-hook on the
wrapped module, which runs right after DDP's buffer broadcast, records rank 1's buffers as the
broadcast left them and puts the real values back, so the forward and backward run normally. The
"control" run hides the adapter's ignore list from DDP, to show the measurement sees broadcasts.
Each rank saves ``DUMP_DIR/rank<r>.pt``: per run its buffers before the sentinel, and (rank 1) the
buffers the forward saw; the test compares them.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from cmoe_adapters import ContinualMoEConfig  # noqa: E402

FEATURE_DIM = 32  # the locator's feature: the first adapted layer's input, the tiny Llama's hidden size


def build(tasks: int):
    config = ContinualMoEConfig(
        r=4, num_experts=2, top_k=1, locator_steps=5, locator_hidden_dim=16, locator_latent_dim=4
    )
    model = get_peft_model(tiny_llama(seed=0), config)
    for index in range(tasks):
        name = f"task{index}"
        model.add_task(name)
        features = torch.randn(64, FEATURE_DIM, generator=torch.Generator().manual_seed(index))
        model.fit_locator(name, features=features)
    model.train()
    return model


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.detach().clone() for name, buffer in module.named_buffers()}


@torch.no_grad()
def overwrite(module: torch.nn.Module) -> None:
    for buffer in module.buffers():
        if buffer.dtype == torch.bool:
            buffer.logical_not_()
        elif buffer.is_floating_point():
            buffer.fill_(float("nan"))
        else:
            buffer.fill_(-1)


def measure(model, rank: int, hide_ignore_list: bool = False) -> dict:
    """One DDP training step; what rank 1's buffers held when the wrapped forward began."""
    before = snapshot(model)
    if hide_ignore_list:  # an instance attribute of the PeftModel shadows the tuner's property
        model._ddp_params_and_buffers_to_ignore = []
    wrapped = DistributedDataParallel(model)
    if hide_ignore_list:
        del model._ddp_params_and_buffers_to_ignore
    seen: dict[str, torch.Tensor] = {}

    def look_and_restore(module, args, kwargs):
        seen.update(snapshot(module))
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(before[name])

    if rank == 1:
        overwrite(model)
    hook = model.register_forward_pre_hook(look_and_restore, with_kwargs=True, prepend=True)
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(7))
    task = model.tasks[-1]
    with model.using_task(task):
        wrapped(input_ids=ids, labels=ids).loss.backward()
    hook.remove()
    model.zero_grad(set_to_none=True)
    return {"before": before, "seen": seen, "ignored": list(wrapped.parameters_to_ignore)}


def main() -> None:
    dump = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    runs = {}
    for tasks in (1, 4):
        model = build(tasks)
        runs[str(tasks)] = measure(model, rank)
    runs["control"] = measure(model, rank, hide_ignore_list=True)
    runs["property"] = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    os.makedirs(dump, exist_ok=True)
    torch.save(runs, os.path.join(dump, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
