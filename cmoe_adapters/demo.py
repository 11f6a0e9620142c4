"""`cmoe demo`: the library doing its job in minutes on a laptop CPU, on real data.

A stream of four visual question answering tasks from the `easy-vqa` data set (64x64 images of one
coloured shape; see `cmoe_adapters.easyvqa.tasks` for the split and why negated yes/no questions
are left out) is learnt one task after another by a tiny LLaVA (CLIP-style vision tower, Llama-style
decoder, word-level tokenizer, real `LlavaProcessor`). The base is pretrained once so its frozen
vision can tell shapes and colours, and cached. Then the same `ContinualMoETrainer` runs the stream
twice, with the same targets, steps and active rank:

- one shared LoRA trained task after task (the baseline, which forgets), and
- the continual mixture of LoRA experts (a router and new experts per task, old ones frozen, tasks
  located per sample by their VAEs at test time).

Both accuracy matrices, the final average, BWT and the locator's accuracy are printed side by side
and written to ``<output>/results.json``, ``results.md`` and ``results.png``; each run's adapters
and its own results are in ``<output>/<run>/``.

    cmoe demo [--tasks 4] [--steps 150] [--seed 0] [--output-dir cmoe-demo] [--preset default]
    python -m cmoe_adapters.demo ...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from transformers import TrainerCallback

from ._peft import adapter_parameters
from .config import ContinualMoEConfig
from .results import ContinualResult, save_heatmaps, write_atomically

PRESETS = ("default", "llava_cmoe", "cl_moe")
BASELINE = "sequential LoRA"
RUN_FILE = "demo_run.json"  # a child process's timing and parameter count, next to its results


@dataclass
class DemoOptions:
    """What the demo runs; every field is a command-line flag."""

    tasks: int = 4
    steps: int = 150  # enough for 85-99% per task on both runs; keeps the cold demo near 5 min on 2 cores
    train_questions: int = 2000
    test_questions: int = 300
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    output_dir: str = "cmoe-demo"
    preset: str = "default"
    cache_dir: str | None = None
    progress: bool = True
    parallel: bool = True  # both streams at once, each on half the cores (see `_run_in_parallel`)

    def problems(self) -> list[str]:
        """Everything wrong with the options, so all of it can be reported at once."""
        from .easyvqa import TASK_ORDER

        found = []
        if not 2 <= self.tasks <= len(TASK_ORDER):
            found.append(
                f"--tasks must be between 2 and {len(TASK_ORDER)} (forgetting needs two), got {self.tasks}"
            )
        for name in ("steps", "train_questions", "test_questions", "batch_size"):
            if getattr(self, name) < 1:
                found.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            found.append(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.preset not in PRESETS:
            found.append(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        return found


def moe_config(preset: str) -> ContinualMoEConfig:
    """The continual mixture of the demo: 4 experts of rank 4, top-2 (rank 8 per token, the baseline
    LoRA's rank), and 2 new experts per later task (each task's router sees all experts so far, so
    fewer new ones keep later tasks' steps cheap)."""
    shape = {"r": 4, "lora_alpha": 8, "num_experts": 4, "top_k": 2, "experts_per_task": 2}
    if preset == "llava_cmoe":
        return ContinualMoEConfig.llava_cmoe(**shape)
    if preset == "cl_moe":
        return ContinualMoEConfig.cl_moe(**shape)
    return ContinualMoEConfig(**shape)


def _check_demo_dependencies() -> None:
    missing = []
    for module, package in (("easy_vqa", "easy-vqa"), ("PIL", "pillow")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise SystemExit(
            f"The demo needs {', '.join(missing)}: pip install 'cmoe-adapters[demo]' (or pip install "
            + " ".join(missing)
            + ")."
        )


def _run_stream(
    name: str,
    peft_config: Any,
    base: torch.nn.Module,
    processor: Any,
    tasks: list,
    options: DemoOptions,
    shared: SharedProgress | None = None,
) -> tuple[ContinualResult, float, int]:
    """One pass over the stream through `ContinualMoETrainer`; returns its result, seconds, parameters."""
    from peft import get_peft_model
    from transformers.trainer_callback import PrinterCallback

    from .data import VisionLanguageCollator
    from .trainer import ContinualMoETrainer, ContinualTrainingArguments

    model = get_peft_model(copy.deepcopy(base), peft_config)
    args = ContinualTrainingArguments(
        output_dir=os.path.join(options.output_dir, _slug(name)),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=not options.progress,
        use_cpu=True,
        eval_batch_size=250,
        eval_max_new_tokens=3,
        seed=options.seed,
    )
    trainer = ContinualMoETrainer(
        model=model, args=args, data_collator=VisionLanguageCollator(processor), processing_class=processor
    )
    if not options.progress:  # quiet: the Trainer would print every log dict instead of its bars
        trainer.remove_callback(PrinterCallback)
    if shared is not None:
        trainer.add_callback(_ReportSteps(shared))
    start = time.perf_counter()
    result = trainer.train_tasks(tasks)
    parameters = sum(p.numel() for p in adapter_parameters(model))
    return result, time.perf_counter() - start, parameters


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Pretrain (or load) the base, run both streams, write and return the report."""
    problems = options.problems()
    if problems:
        raise ValueError("Invalid demo options:\n  - " + "\n  - ".join(problems))
    _check_demo_dependencies()
    from peft import LoraConfig

    from .architectures import default_target_modules
    from .easyvqa import pretrained_base

    start = time.perf_counter()
    torch.manual_seed(options.seed)
    base, processor = pretrained_base(
        cache_dir=options.cache_dir, seed=options.seed, progress=options.progress
    )
    base_seconds = time.perf_counter() - start
    targets = default_target_modules(base)  # the language model's linears, for both runs
    moe_name = "continual MoE" if options.preset == "default" else f"continual MoE ({options.preset})"
    runs = {
        BASELINE: LoraConfig(r=8, lora_alpha=16, target_modules=targets),
        moe_name: moe_config(options.preset),
    }
    report: dict[str, Any] = {"options": asdict(options), "base_seconds": base_seconds, "runs": {}}
    if options.parallel and (os.cpu_count() or 1) >= 2:
        outcomes = _run_in_parallel(runs, options)
    else:
        tasks = demo_tasks(options)
        outcomes = {}
        for index, (name, peft_config) in enumerate(runs.items(), start=1):
            _say(options, f"\n[{index}/{len(runs)}] {name}: {len(tasks)} tasks x {options.steps} steps")
            outcomes[name] = _run_stream(name, peft_config, base, processor, tasks, options)
    results = {}
    for name, (result, seconds, parameters) in outcomes.items():
        results[name] = result
        report["runs"][name] = {**result.to_dict(), "seconds": seconds, "adapter_parameters": parameters}
    report["seconds"] = time.perf_counter() - start
    report["table"] = side_by_side(results)
    _write_report(report, results, options.output_dir)
    return report


def demo_tasks(options: DemoOptions) -> list:
    """The stream: the first `options.tasks` easy-vqa tasks, sampled with the demo's seed."""
    from .easyvqa import TASK_ORDER, load_task
    from .trainer import Task

    return [
        Task(
            name,
            load_task(name, "train", options.train_questions, seed=options.seed),
            load_task(name, "test", options.test_questions, seed=options.seed + 1),
        )
        for name in TASK_ORDER[: options.tasks]
    ]


@dataclass
class SharedProgress:
    """What the stream processes share: steps done (for the bar) and runs finished (for the cores)."""

    steps: Any  # multiprocessing.Value("i")
    finished: Any  # multiprocessing.Value("i")
    runs: int
    cores: int

    def threads_for_me(self) -> int:
        """An equal share of the cores among the runs still training."""
        return max(1, self.cores // max(1, self.runs - self.finished.value))


class _ReportSteps(TrainerCallback):
    """Counts steps for the parent's progress bar; takes over the cores of runs that finished."""

    def __init__(self, shared: SharedProgress) -> None:
        self.shared = shared

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.shared.steps.get_lock():
            self.shared.steps.value += 1
        threads = self.shared.threads_for_me()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


def _stream_process(name: str, peft_config: Any, options: DemoOptions, shared: SharedProgress) -> None:
    """One stream in a child process: load the cached base, train, leave results in the run's folder."""
    from .easyvqa import pretrained_base

    torch.set_num_threads(shared.threads_for_me())
    base, processor = pretrained_base(cache_dir=options.cache_dir, seed=options.seed, progress=False)
    quiet = replace(options, progress=False)
    try:
        _, seconds, parameters = _run_stream(
            name, peft_config, base, processor, demo_tasks(options), quiet, shared
        )
    finally:
        with shared.finished.get_lock():
            shared.finished.value += 1
    summary = {"seconds": seconds, "adapter_parameters": parameters}
    write_atomically(os.path.join(options.output_dir, _slug(name), RUN_FILE), json.dumps(summary))


def _run_in_parallel(
    runs: dict[str, Any], options: DemoOptions
) -> dict[str, tuple[ContinualResult, float, int]]:
    """Both streams at once, one process each with half the cores, under one progress bar.

    A tiny model's training step gains little from a second thread (1.5x on 2 cores), so two
    single-threaded streams side by side finish sooner than one after the other; when one run
    finishes, the other takes over its cores.
    """
    import multiprocessing

    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked OpenMP state
    shared = SharedProgress(context.Value("i", 0), context.Value("i", 0), len(runs), os.cpu_count() or 2)
    counter = shared.steps
    processes = {
        name: context.Process(
            target=_stream_process, args=(name, config, options, shared), name=f"cmoe demo: {name}"
        )
        for name, config in runs.items()
    }
    total = len(runs) * options.tasks * options.steps
    _say(options, f"\n{' and '.join(runs)} side by side: {options.tasks} tasks x {options.steps} steps each")
    try:
        for process in processes.values():
            process.start()
        with tqdm(
            total=total, desc="training both streams", unit="step", disable=not options.progress
        ) as bar:
            while any(process.is_alive() for process in processes.values()):
                time.sleep(0.5)
                bar.update(min(counter.value, total) - bar.n)
            bar.update(min(counter.value, total) - bar.n)
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()
            process.join()
    outcomes = {}
    for name, process in processes.items():
        if process.exitcode != 0:
            raise RuntimeError(
                f"The '{name}' stream failed (exit code {process.exitcode}); see its error above."
            )
        folder = os.path.join(options.output_dir, _slug(name))
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as handle:
            summary = json.load(handle)
        outcomes[name] = (ContinualResult.load(folder), summary["seconds"], summary["adapter_parameters"])
    return outcomes


def _say(options: DemoOptions, text: str) -> None:
    if options.progress:
        print(text, flush=True)


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def side_by_side(results: dict[str, ContinualResult]) -> str:
    """The runs' accuracy matrices next to each other, then their summaries, as Markdown."""
    names = list(results)
    tasks = results[names[0]].tasks
    header = "| after \\ on | " + " | ".join(
        f"{n}: {t}" if j == 0 else t for n in names for j, t in enumerate(tasks)
    )
    lines = [header + " |", "|---" + "|---:" * (len(names) * len(tasks)) + "|"]
    for i, task in enumerate(tasks):
        cells = []
        for name in names:
            row = results[name].accuracy_matrix[i]
            cells += [_percent(row[j]) if j <= i else "" for j in range(len(tasks))]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---" + "|---:" * len(names) + "|"]
    summary = (
        ("final average", lambda r: _percent(r.final_average)),
        ("BWT", lambda r: _percent(r.bwt, signed=True)),
        ("forgetting", lambda r: _percent(r.forgetting)),
        ("locator accuracy", lambda r: _percent(r.locator_accuracy)),
    )
    for label, value in summary:
        lines.append(f"| {label} | " + " | ".join(value(results[n]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def _write_report(report: dict[str, Any], results: dict[str, ContinualResult], output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    write_atomically(os.path.join(output_dir, "results.json"), json.dumps(report, indent=2))
    options = report["options"]
    markdown = (
        f"# cmoe demo: easy-vqa, {options['tasks']} tasks, {options['steps']} steps x "
        f"{options['batch_size']} per task, {options['test_questions']} test questions per task\n\n"
        "Accuracy (%) on each task (columns) after training each task (rows); tasks are located by "
        "the continual MoE's locator, never given.\n\n"
        + report["table"]
        + f"\nWall time: {report['seconds']:.0f} s "
        f"(base {report['base_seconds']:.0f} s).\n"
    )
    write_atomically(os.path.join(output_dir, "results.md"), markdown)
    save_heatmaps(results, os.path.join(output_dir, "results.png"))


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(
        prog="cmoe demo",
        description="Continual VQA on easy-vqa with a tiny LLaVA on CPU: sequential LoRA (forgets) "
        "against the continual mixture of LoRA experts (does not).",
    )
    parser.add_argument("--tasks", type=int, default=defaults.tasks, help="tasks of the stream, 2-4")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per task")
    parser.add_argument("--train-questions", type=int, default=defaults.train_questions, help="per task")
    parser.add_argument("--test-questions", type=int, default=defaults.test_questions, help="per task")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="base, data sample and training")
    parser.add_argument("--output-dir", default=defaults.output_dir, help="results and adapters go here")
    parser.add_argument(
        "--preset", choices=PRESETS, default=defaults.preset, help="the continual MoE's method"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the pretrained base is cached (default: $CMOE_ADAPTERS_CACHE or ~/.cache/cmoe_adapters)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the two streams one after the other, in this process (bit-reproducible; side by side, "
        "a stream's thread count changes when the other finishes, which changes float rounding)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cmoe demo`` and ``python -m cmoe_adapters.demo``; returns the exit code."""
    args = build_parser().parse_args(argv)
    options = DemoOptions(
        tasks=args.tasks,
        steps=args.steps,
        train_questions=args.train_questions,
        test_questions=args.test_questions,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        output_dir=args.output_dir,
        preset=args.preset,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        parallel=not args.sequential,
    )
    problems = options.problems()
    if problems:
        print("cmoe demo: " + "; ".join(problems), file=sys.stderr)
        return 2
    report = run_demo(options)
    print("\n" + report["table"])
    seconds, base_seconds = report["seconds"], report["base_seconds"]
    print(f"wall time {seconds:.0f} s (base {base_seconds:.0f} s); results in {options.output_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
