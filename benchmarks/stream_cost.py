"""What a long task stream costs: train step, activation memory and decoding at task t vs task 1.

A continual mixture must not get slower, bigger or hungrier per token as tasks accumulate. This
script grows one model task by task (``add_task("t0")``, ``add_task("t1")``, ...; nothing but the
newest task is trained, as ``add_task`` freezes everything older) and measures, on CPU, fp32, one
thread, in one run:

1. **Train step of the newest task** at t = 1, 4, 8, 20 tasks: forward with labels, plus
   ``router_aux_loss()``, backward, an AdamW step on the trainable parameters (a fresh optimizer
   after every ``add_task``, as the trainer does), inside ``model.using_task(newest)``. Each step
   is timed alternately with the same step of a peft ``LoraConfig(r=r * top_k)`` model on the same
   base (same seed, same targets, same batch); medians after one warm-up. Also: the adapter
   parameters that task 2 and task 20 add.
2. **Activation memory** of that train step at t = 1, 8, 20: bytes of the distinct storages saved
   for backward (``torch.autograd.graph.saved_tensors_hooks`` over forward + aux loss),
   parameters' and buffers' storages excluded (tensors a step builds from parameters, such as
   concatenated expert weights, count: they live until backward like any activation).
3. **One decode step of generate** with 20 tasks registered and every locator fitted, the task
   located against ``task="t19"`` given (and LoRA for reference): the time of
   ``generate(max_new_tokens=N + 1)`` minus ``generate(max_new_tokens=1)``, divided by N, and the
   prefill (``max_new_tokens=1``, where locating happens). t19's locator is fitted on the features of
   other random prompts, t0..t18's on random features far from them, so located and given route
   through the same task and differ only by locating.

Two configs: ``ContinualMoEConfig()`` (r=8, top_k=2, lora_alpha=16, 4 experts, 4 new per task) and
``ContinualMoEConfig.llava_cmoe()``. Without the trainer there is no probe phase: its tasks are
added with plain ``add_task``, i.e. every layer expanded (its 2 experts per task everywhere, the
most it can grow). Two randomly initialised Llama shapes, all 7 linears of every block adapted:
``small`` (hidden 512, 4 layers, intermediate 1376, 8 heads, batch 8 x 256 tokens) and ``wide``
(hidden 1024, 8 layers, intermediate 2752, 16 heads, batch 2 x 256, to keep the whole run near 10
minutes); vocabulary 8192 (``--vocab``) so that the unadapted lm_head does not hide the adapters.
Decoding uses the small shape.

    python benchmarks/stream_cost.py                      # full run (about 10 min on one core)
    python benchmarks/stream_cost.py --quick              # 64-token sequences, 1 repeat: a smoke test
    python benchmarks/stream_cost.py --shapes small --sections train memory --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from cmoe_adapters import ContinualMoEConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_TASKS = (1, 4, 8, 20)
MEMORY_TASKS = (1, 8, 20)
PARAM_TASKS = (2, 20)
DECODE_TASKS = 20
SEED = 0

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass(frozen=True)
class Shape:
    """A Llama built from config, and the training batch it is measured on."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    batch: int
    seq: int


SHAPES = {
    "small": Shape("small", hidden=512, layers=4, intermediate=1376, heads=8, batch=8, seq=256),
    "wide": Shape("wide", hidden=1024, layers=8, intermediate=2752, heads=16, batch=2, seq=256),
}
CONFIGS: dict[str, Callable[..., ContinualMoEConfig]] = {
    "default": ContinualMoEConfig,
    "llava_cmoe": ContinualMoEConfig.llava_cmoe,
}


# -- models ---------------------------------------------------------------------------------------


def build_base(shape: Shape, vocab: int) -> transformers.LlamaForCausalLM:
    """The same random Llama every time (seeded), fp32, in training mode."""
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def moe_model(shape: Shape, vocab: int, preset: str, **overrides: Any) -> PeftModel:
    """The base with a continual mixture on all 7 linears, no task yet."""
    config = CONFIGS[preset](target_modules=list(TARGETS), **overrides)
    return get_peft_model(build_base(shape, vocab), config).train()


def lora_model(shape: Shape, vocab: int, rank: int) -> PeftModel:
    """peft's LoRA of the mixture's active rank, on the same base and targets."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS))
    return get_peft_model(build_base(shape, vocab), config).train()


def active_rank(preset: str) -> int:
    config = CONFIGS[preset](target_modules=list(TARGETS))
    return config.r * config.top_k


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model), lr=1e-4)


def training_batch(shape: Shape, vocab: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(3, vocab, (shape.batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


# -- one train step -------------------------------------------------------------------------------


def step_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward with labels plus the router's load-balancing loss when the model has one."""
    loss = model(**batch).loss
    aux = getattr(model, "router_aux_loss", None)
    extra = aux() if aux is not None else None
    return loss if extra is None else loss + extra


def train_step(model: PeftModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """Seconds of forward + aux loss + backward + optimizer step."""
    start = time.perf_counter()
    step_loss(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def interleaved_medians(steps: list[Callable[[], float]], repeats: int) -> list[float]:
    """Median seconds of each step, run in turn, `repeats` times after one warm-up round."""
    times: list[list[float]] = [[] for _ in steps]
    for round_index in range(repeats + 1):
        for step, measured in zip(steps, times, strict=True):
            elapsed = step()
            if round_index > 0:
                measured.append(elapsed)
    return [statistics.median(measured) for measured in times]


# -- activation memory ----------------------------------------------------------------------------


def storage_ptrs(model: torch.nn.Module) -> set[int]:
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_activation_bytes(model: PeftModel, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for the step's backward."""
    excluded = storage_ptrs(model)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step_loss(model, batch)
    del loss  # frees the graph; no backward needed to know what it held
    return sum(saved.values())


# -- the stream -----------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """Measurements of one (shape, config) stream; times are (moe, lora) seconds per task count."""

    times: dict[int, tuple[float, float]]
    trainable: dict[int, int]
    memory: dict[int, int]
    added_params: dict[int, int]


@contextlib.contextmanager
def newest_task(model: PeftModel) -> Iterator[None]:
    with model.using_task(model.tasks[-1]):
        yield


def grow_to(model: PeftModel, count: int, added: dict[int, int]) -> None:
    """Add tasks ``t<i>`` until `count` are registered, recording the parameters each one adds."""
    while len(model.tasks) < count:
        before = parameter_count(model)
        model.add_task(f"t{len(model.tasks)}")
        added[len(model.tasks)] = parameter_count(model) - before


def run_stream(
    shape: Shape,
    preset: str,
    lora: PeftModel,
    lora_optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> StreamResult:
    """Grow one mixture through every measured task count, timing and measuring on the way."""
    model = moe_model(shape, args.vocab, preset)
    result = StreamResult(times={}, trainable={}, memory={}, added_params={})
    wanted = sorted(set(args.train_tasks) | set(args.memory_tasks) | set(PARAM_TASKS))
    for count in wanted:
        grow_to(model, count, result.added_params)
        with newest_task(model):
            if count in args.train_tasks:
                optimizer = optimizer_for(model)  # a fresh one per task, after add_task
                moe_s, lora_s = interleaved_medians(
                    [
                        functools.partial(train_step, model, optimizer, batch),
                        functools.partial(train_step, lora, lora_optimizer, batch),
                    ],
                    args.repeats,
                )
                result.times[count] = (moe_s, lora_s)
                result.trainable[count] = sum(p.numel() for p in trainable(model))
                del optimizer
            if count in args.memory_tasks:
                result.memory[count] = saved_activation_bytes(model, batch)
    return result


# -- decoding -------------------------------------------------------------------------------------


def prompt_inputs(batch: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def located_model(shape: Shape, vocab: int, tasks: int, prompt: int) -> PeftModel:
    """The default mixture with `tasks` tasks and fitted locators; prompts like ours locate the last.

    The newest task's locator is fitted on the features of 64 other random prompts, every earlier
    task's on random features far from them, so that locating picks the same task as given.
    """
    model = moe_model(shape, vocab, "default", locator_steps=50)
    own = model.locator_features(**prompt_inputs(64, prompt, vocab, seed=SEED + 3))
    generator = torch.Generator().manual_seed(SEED + 4)
    for index in range(tasks):
        name = f"t{index}"
        model.add_task(name)
        other = 0.1 * torch.randn(own.shape, generator=generator) + index + 1
        model.fit_locator(name, features=own if index == tasks - 1 else other)
    model.freeze()
    return model.eval()


def generate_seconds(
    model: PeftModel, inputs: dict[str, torch.Tensor], new_tokens: int, **task: Any
) -> float:
    start = time.perf_counter()
    model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **task,
    )
    return time.perf_counter() - start


def decode_step_seconds(
    runs: list[Callable[[int], float]], new_tokens: int, repeats: int
) -> list[tuple[float, float]]:
    """Per run: (median prefill seconds, median seconds per decode step), measured alternately."""
    prefill: list[list[float]] = [[] for _ in runs]
    per_step: list[list[float]] = [[] for _ in runs]
    for round_index in range(repeats + 1):
        for run, first, decode in zip(runs, prefill, per_step, strict=True):
            one = run(1)
            longer = run(new_tokens + 1)
            if round_index > 0:
                first.append(one)
                decode.append((longer - one) / new_tokens)
    return [(statistics.median(p), statistics.median(d)) for p, d in zip(prefill, per_step, strict=True)]


def run_decode(args: argparse.Namespace) -> None:
    shape = SHAPES["small"]
    inputs = prompt_inputs(shape.batch, args.prompt, args.vocab, seed=SEED + 2)
    moe = located_model(shape, args.vocab, args.decode_tasks, args.prompt)
    lora = lora_model(shape, args.vocab, active_rank("default")).eval()
    last = moe.tasks[-1]
    runs: list[Callable[[int], float]] = [
        lambda n: generate_seconds(moe, inputs, n, task=last),
        lambda n: generate_seconds(moe, inputs, n),
        lambda n: generate_seconds(lora, inputs, n),
    ]
    with torch.no_grad():
        located_tasks = moe.locate_tasks(**inputs)
        if set(located_tasks) != {last}:  # else "located" would time another route (or the base model)
            raise RuntimeError(f"The benchmark's prompts were located to {set(located_tasks)}, not {last!r}.")
        (given_pre, given), (located_pre, located), (lora_pre, lora_step) = decode_step_seconds(
            runs, args.new_tokens, args.repeats
        )
    print(
        f"\n## 3. One decode step, {args.decode_tasks} tasks (default config), {shape.name} shape, batch "
        f"{shape.batch}, prompt {args.prompt} tokens, {args.new_tokens} decode steps, median of "
        f"{args.repeats}\n"
    )
    print(f"Located tasks of the batch: {sorted(set(located_tasks))}.\n")
    print(f"| | task given ({last}) | task located | located / given | peft LoRA | given / LoRA |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| ms per decode step | {given * 1e3:.2f} | {located * 1e3:.2f} | {located / given:.3f} | "
        f"{lora_step * 1e3:.2f} | {given / lora_step:.3f} |"
    )
    print(
        f"| ms prefill + 1 token | {given_pre * 1e3:.1f} | {located_pre * 1e3:.1f} | "
        f"{located_pre / given_pre:.3f} | {lora_pre * 1e3:.1f} | {given_pre / lora_pre:.3f} |"
    )


# -- reports --------------------------------------------------------------------------------------


def print_times(shape: Shape, preset: str, result: StreamResult, lora_trainable: int) -> None:
    first_moe, first_lora = result.times[min(result.times)]
    print(f"\n### {shape.name} / {preset} (peft LoRA trains {lora_trainable:,} parameters)\n")
    print(
        "| tasks | trainable | MoE s | peft LoRA s | MoE / LoRA | MoE t / task 1 | (MoE / LoRA) t / task 1 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count, (moe_s, lora_s) in sorted(result.times.items()):
        drift_free = (moe_s / lora_s) / (first_moe / first_lora)
        print(
            f"| {count} | {result.trainable[count]:,} | {moe_s:.3f} | {lora_s:.3f} | {moe_s / lora_s:.3f} "
            f"| {moe_s / first_moe:.3f} | {drift_free:.3f} |"
        )


def print_memory(shape: Shape, preset: str, result: StreamResult, lora_bytes: int) -> None:
    first = result.memory[min(result.memory)]
    print(f"\n### {shape.name} / {preset} (peft LoRA: {lora_bytes / 2**20:.1f} MiB)\n")
    print("| tasks | MoE MiB | MoE / LoRA | t / task 1 |")
    print("|---:|---:|---:|---:|")
    for count, nbytes in sorted(result.memory.items()):
        print(f"| {count} | {nbytes / 2**20:.1f} | {nbytes / lora_bytes:.3f} | {nbytes / first:.3f} |")


def print_params(rows: Iterable[tuple[str, str, StreamResult]]) -> None:
    print("\n## Adapter parameters added by one task\n")
    print("| shape | config | task 2 adds | task 20 adds | task 20 / task 2 |")
    print("|---|---|---:|---:|---:|")
    for shape_name, preset, result in rows:
        second, last = result.added_params.get(2), result.added_params.get(20)
        if second is None or last is None:
            continue
        print(f"| {shape_name} | {preset} | {second:,} | {last:,} | {last / second:.3f} |")


def header(args: argparse.Namespace) -> None:
    print(
        f"# Stream cost: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, {torch.get_num_threads()} thread(s), fp32 on CPU"
    )
    print(
        f"# vocab {args.vocab}, sequences of {args.seq or 256} tokens, median of {args.repeats} after "
        "1 warm-up, MoE and LoRA measured alternately"
    )


def run_shape(shape: Shape, args: argparse.Namespace) -> list[tuple[str, str, StreamResult]]:
    """Both configs on one shape; prints the time and memory tables of that shape."""
    seq = args.seq or shape.seq
    batch = training_batch(shape, args.vocab, seq)
    rows = []
    loras: dict[int, tuple[PeftModel, torch.optim.Optimizer, int]] = {}  # by rank
    for preset in CONFIGS:
        rank = active_rank(preset)
        if rank not in loras:
            lora = lora_model(shape, args.vocab, rank)
            lora_bytes = saved_activation_bytes(lora, batch) if args.memory_tasks else 0
            loras[rank] = (lora, optimizer_for(lora), lora_bytes)
        lora, lora_optimizer, lora_bytes = loras[rank]
        result = run_stream(shape, preset, lora, lora_optimizer, batch, args)
        if "train" in args.sections:
            if preset == next(iter(CONFIGS)):
                print(
                    f"\n## 1. Train step, {shape.name} shape (hidden {shape.hidden}, {shape.layers} layers, "
                    f"intermediate {shape.intermediate}), batch {shape.batch} x {seq}, LoRA r = "
                    f"{active_rank(preset)}"
                )
            print_times(shape, preset, result, sum(p.numel() for p in trainable(lora)))
        rows.append((shape.name, preset, result, lora_bytes))
    if "memory" in args.sections:
        print(f"\n## 2. Saved activations of a train step, {shape.name} shape, batch {shape.batch} x {seq}")
        for _, preset, result, lora_bytes in rows:
            print_memory(shape, preset, result, lora_bytes)
    return [(shape_name, preset, result) for shape_name, preset, result, _ in rows]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--quick", action="store_true", help="64-token sequences, 1 repeat, 4 decode steps")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "wide"])
    parser.add_argument("--sections", nargs="+", choices=["train", "memory", "decode"], default=None)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=None, help="training sequence length (default: 256)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens of the decode benchmark")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed")
    parser.add_argument("--decode-tasks", type=int, default=DECODE_TASKS, help="tasks registered for decode")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.seq, args.repeats, args.new_tokens, args.prompt = args.seq or 64, 1, 4, 16
    args.sections = args.sections or ["train", "memory", "decode"]
    args.train_tasks = TRAIN_TASKS if "train" in args.sections else ()
    args.memory_tasks = MEMORY_TASKS if "memory" in args.sections else ()
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    header(args)
    start = time.perf_counter()
    rows = []
    if {"train", "memory"} & set(args.sections):
        for name in args.shapes:
            rows += run_shape(SHAPES[name], args)
        print_params(rows)
    if "decode" in args.sections:
        run_decode(args)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
