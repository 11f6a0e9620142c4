"""Forward+backward time of one expert layer against peft's LoRA at the same active rank.

For every (experts E, top_k) the mixture of E rank-r experts is timed against a peft LoRA layer of
rank ``r * top_k`` (``r * E`` when dense) on the same frozen ``nn.Linear(d, d)`` and the same
input, in one run, with the two measurements interleaved so that a machine slowing down affects
both alike. A second table compares 8 registered tasks with 1 (same experts, same active task):
the cost per token must not grow with the number of tasks. A third computes the same task on the
sparse and on the dense path, which is where `expert_compute="auto"` takes its thresholds from.

    python benchmarks/layer_speed.py                  # d=2048, 4096 tokens (realistic)
    python benchmarks/layer_speed.py --dim 512 --tokens 1024 --repeats 5   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from cmoe_adapters import ContinualMoEConfig, ContinualMoELayer
from cmoe_adapters.routing import RoutingState
from cmoe_adapters.sparse import prefer_sparse


def moe_layer(
    base: nn.Linear, r: int, experts: int, top_k: int | None, tasks: int, compute: str = "auto"
) -> ContinualMoELayer:
    """A layer with `experts` experts shared by `tasks` tasks (one router each); the last task trains."""
    config = ContinualMoEConfig(
        r=r, lora_alpha=2 * r, num_experts=experts, top_k=top_k, experts_per_task=0, expert_compute=compute
    )
    config.task_records = [{"name": f"task{i}"} for i in range(tasks)]
    layer = ContinualMoELayer(base, "default", config, RoutingState(), layer_name="bench")
    layer.routing.reset(tasks - 1)
    layer.cmoe_experts["default"].requires_grad_(True)  # same trainable experts whatever the task count
    return layer.train()


def lora_layer(base: nn.Linear, rank: int) -> LoraLinear:
    layer = LoraLinear(base, "default", LoraConfig(r=rank, lora_alpha=2 * rank), r=rank, lora_alpha=2 * rank)
    return layer.train()


def step_time(layer: nn.Module, x: torch.Tensor, with_aux: bool) -> float:
    start = time.perf_counter()
    out = layer(x)
    loss = out.float().pow(2).mean()
    if with_aux and layer.routing.aux_losses:
        loss = loss + 0.01 * torch.stack(layer.routing.aux_losses).mean()
        layer.routing.aux_losses.clear()
    loss.backward()
    return time.perf_counter() - start


def compare(
    make_a: Callable[[], nn.Module], make_b: Callable[[], nn.Module], x, repeats
) -> tuple[float, float]:
    """Median seconds of a and b, measured alternately after one warm-up each."""
    a, b = make_a(), make_b()
    times_a, times_b = [], []
    for i in range(repeats + 1):
        for layer, times in ((a, times_a), (b, times_b)):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            elapsed = step_time(layer, x, with_aux=isinstance(layer, ContinualMoELayer))
            if i > 0:
                times.append(elapsed)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--r", type=int, default=8, help="rank of each expert")
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    base = nn.Linear(args.dim, args.dim, bias=False).to(args.device, dtype).requires_grad_(False)
    x = torch.randn(args.tokens // 512 or 1, min(args.tokens, 512), args.dim, device=args.device, dtype=dtype)
    x.requires_grad_(True)
    print(
        f"# expert layer vs peft LoRA, forward+backward, d={args.dim}, {x.shape[0] * x.shape[1]} tokens, "
        f"r={args.r} per expert, {args.dtype} on {args.device} ({torch.get_num_threads()} threads), "
        f"median of {args.repeats}\n"
    )
    print("| experts | top_k | active rank | mixture ms | peft LoRA ms | mixture / LoRA |")
    print("|---:|---:|---:|---:|---:|---:|")
    for experts in args.experts:
        for top_k in (1, 2, None):
            if (top_k is not None and top_k > experts) or (top_k is None and experts == 1):
                continue
            active = args.r * (experts if top_k is None else top_k)
            moe, lora = compare(
                lambda e=experts, k=top_k: moe_layer(base, args.r, e, k, tasks=1),
                lambda a=active: lora_layer(base, a),
                x,
                args.repeats,
            )
            label = "dense" if top_k is None else top_k
            print(
                f"| {experts} | {label} | {active} | {moe * 1e3:.1f} | {lora * 1e3:.1f} | {moe / lora:.3f} |"
            )

    print("\n| experts | top_k | 8 tasks ms | 1 task ms | 8 tasks / 1 task |")
    print("|---:|---:|---:|---:|---:|")
    for experts, top_k in ((8, 2), (32, 2)):
        eight, one = compare(
            lambda e=experts, k=top_k: moe_layer(base, args.r, e, k, tasks=8),
            lambda e=experts, k=top_k: moe_layer(base, args.r, e, k, tasks=1),
            x,
            args.repeats,
        )
        print(f"| {experts} | {top_k} | {eight * 1e3:.1f} | {one * 1e3:.1f} | {eight / one:.3f} |")

    print("\n## sparse vs dense: the same task computed both ways (what `expert_compute='auto'` chooses)\n")
    print("| experts | top_k | sparse ms | dense ms | sparse / dense | auto picks |")
    print("|---:|---:|---:|---:|---:|---|")
    for experts in args.experts:
        for top_k in (1, 2):
            if top_k >= experts:
                continue
            sparse, dense = compare(
                lambda e=experts, k=top_k: moe_layer(base, args.r, e, k, tasks=1, compute="sparse"),
                lambda e=experts, k=top_k: moe_layer(base, args.r, e, k, tasks=1, compute="dense"),
                x,
                args.repeats,
            )
            pick = "sparse" if prefer_sparse(experts, top_k, x.device, x.dtype) else "dense"
            print(
                f"| {experts} | {top_k} | {sparse * 1e3:.1f} | {dense * 1e3:.1f} | {sparse / dense:.3f} "
                f"| {pick} |"
            )


if __name__ == "__main__":
    main()
