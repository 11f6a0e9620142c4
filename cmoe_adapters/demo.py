"""`cmoe demo`: the library doing its job in minutes on a laptop CPU, on real data.

A stream of four visual question answering tasks from the `easy-vqa` data set (64x64 images of one
coloured shape; see `cmoe_adapters.easyvqa.tasks` for the split and why negated yes/no questions
are left out) is learnt one task after another by a tiny LLaVA (CLIP-style vision tower, Llama-style
decoder, word-level tokenizer, real `LlavaProcessor`). The base must be pretrained so its frozen
vision can tell shapes and colours: the package ships one (``pretrain(seed=0)``, ~2.5 min on two
cores, see `cmoe_adapters.easyvqa.pretrain`), and ``--pretrain-base`` makes one here instead,
cached under ``--cache-dir``. Then the same `ContinualMoETrainer` runs the stream twice, with the
same targets, steps and active rank:

- one shared LoRA trained task after task (the baseline, which forgets), and
- the continual mixture of LoRA experts (a router and new experts per task, old ones frozen, tasks
  located per sample by their VAEs at test time).

Both accuracy matrices, the final average, BWT and the locator's accuracy are printed side by side
and written to ``<output>/results.json``, ``results.md`` and ``results.png``; each run's adapters
and its own results are in ``<output>/<run>/``.

``--fast`` runs every one of those steps (pretraining included, into a temporary directory) with a
few steps on a little data, in ~25 s on two cores: a check that the demo works (CI runs it), whose
numbers mean nothing.

    cmoe demo [--tasks 4] [--steps 100] [--seed 0] [--output-dir cmoe-demo] [--preset default]
              [--pretrain-base [--cache-dir DIR]] [--fast]
    python -m cmoe_adapters.demo ...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from ._peft import adapter_parameters
from .config import PRESETS, ContinualMoEConfig
from .results import ContinualResult, save_heatmaps, write_atomically

BASELINE = "sequential LoRA"
RUN_FILE = "demo_run.json"  # a child process's timing and parameter count, next to its results
FAST_NOTE = (
    "--fast: a few steps of every stage (base pretraining included) on a little data, to check that "
    "the demo runs end to end; the base knows nothing and these numbers mean nothing."
)


@dataclass
class DemoOptions:
    """What the demo runs; every field is a command-line flag."""

    tasks: int = 4
    # 93-99% per task on both runs with the shipped base, as with 150; at 60 the yes/no tasks fall behind
    steps: int = 100
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
    pretrain_base: bool = False  # pretrain the base here (cached under cache_dir), not the shipped one
    fast: bool = False  # pretrain a throw-away base for a few steps; see `fast_options`

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
        if self.fast and self.pretrain_base:
            found.append("--fast pretrains a throw-away base of its own; drop --pretrain-base or --fast")
        return found


# What `--fast` changes: two tasks, a few steps, a little data (the base: FAST_SCHEDULE's few steps).
FAST_OVERRIDES: dict[str, Any] = {"tasks": 2, "steps": 4, "train_questions": 64, "test_questions": 24}


def fast_options(**changes: Any) -> DemoOptions:
    """The options of ``cmoe demo --fast``, with `changes` (explicit flags) on top."""
    return DemoOptions(**{**FAST_OVERRIDES, "fast": True, **changes})


def moe_config(preset: str) -> ContinualMoEConfig:
    """The continual mixture of the demo: 4 experts of rank 4, top-2 (rank 8 per token, the baseline
    LoRA's rank), and 2 new experts per later task (each task's router sees all experts so far, so
    fewer new ones keep later tasks' steps cheap)."""
    shape = {"r": 4, "lora_alpha": 8, "num_experts": 4, "top_k": 2, "experts_per_task": 2}
    return ContinualMoEConfig.from_preset(preset, **shape)


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


@dataclass
class Base:
    """The base both streams start from, and where it is saved (stream processes load it from there)."""

    model: torch.nn.Module
    processor: Any
    path: Path
    source: str  # "shipped", "pretrained" (--pretrain-base) or "fast"
    about: str  # one line for the user: what this base is and how to re-create it


def prepare_base(options: DemoOptions, scratch: Path) -> Base:
    """The shipped base; with ``--pretrain-base`` one pretrained here (cached); with ``--fast`` one
    pretrained for a few steps into `scratch`, never into the cache, where it could pass for a base."""
    from .easyvqa import pretrain

    if options.fast:
        kwargs = {"seed": options.seed, "schedule": pretrain.FAST_SCHEDULE}
        model, processor = pretrain.pretrained_base(scratch, progress=options.progress, **kwargs)
        about = "a base pretrained just now for a few steps (--fast), in a temporary directory"
        return Base(model, processor, pretrain.cached_base_path(scratch, **kwargs), "fast", about)
    if options.pretrain_base:
        path = pretrain.cached_base_path(options.cache_dir, options.seed)
        how = "loaded from the cache" if (path / pretrain.METRICS_FILE).is_file() else "cached"
        model, processor = pretrain.pretrained_base(options.cache_dir, options.seed, options.progress)
        about = (
            f"base pretrained here by cmoe_adapters.easyvqa.pretrain, seed {options.seed}, {how} at {path}"
        )
        return Base(model, processor, path, "pretrained", about)
    model, processor = pretrain.shipped_base()
    about = (
        f"shipped base, pretrained by cmoe_adapters.easyvqa.pretrain with seed {pretrain.SHIPPED_SEED}; "
        "re-create it with `cmoe demo --pretrain-base`"
    )
    if options.seed != pretrain.SHIPPED_SEED:
        about += f" (--seed {options.seed} sets the data and the training; with --pretrain-base the base too)"
    return Base(model, processor, pretrain.SHIPPED_BASE, "shipped", about)


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Load (or pretrain) the base, run both streams, write and return the report."""
    problems = options.problems()
    if problems:
        raise ValueError("Invalid demo options:\n  - " + "\n  - ".join(problems))
    _check_demo_dependencies()
    with tempfile.TemporaryDirectory(prefix="cmoe-demo-") as scratch:
        return _run_demo(options, Path(scratch))


def _run_demo(options: DemoOptions, scratch: Path) -> dict[str, Any]:
    from peft import LoraConfig

    from .architectures import default_target_modules
    from .easyvqa.pretrain import base_metrics

    if options.fast:
        _say(options, FAST_NOTE)
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    base = prepare_base(options, scratch)
    base_seconds = time.perf_counter() - start
    _say(options, f"base: {base.about}")
    targets = default_target_modules(base.model)  # the language model's linears, for both runs
    moe_name = "continual MoE" if options.preset == "default" else f"continual MoE ({options.preset})"
    runs = {
        BASELINE: LoraConfig(r=8, lora_alpha=16, target_modules=targets),
        moe_name: moe_config(options.preset),
    }
    report: dict[str, Any] = {"options": asdict(options), "base_seconds": base_seconds, "runs": {}}
    if options.fast:
        report["note"] = FAST_NOTE
    report["base"] = {"source": base.source, "about": base.about, "metrics": base_metrics(base.path)}
    if options.parallel and (os.cpu_count() or 1) >= 2:
        outcomes = _run_in_parallel(runs, options, base.path)
    else:
        tasks = demo_tasks(options)
        outcomes = {}
        for index, (name, peft_config) in enumerate(runs.items(), start=1):
            _say(options, f"\n[{index}/{len(runs)}] {name}: {len(tasks)} tasks x {options.steps} steps")
            result, seconds, parameters = _run_stream(
                name, peft_config, base.model, base.processor, tasks, options
            )
            outcomes[name] = (result, {"seconds": seconds, "adapter_parameters": parameters})
    results = {}
    for name, (result, summary) in outcomes.items():
        results[name] = result
        report["runs"][name] = {**result.to_dict(), **summary}
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
    """Counts steps for the parent's progress bar; takes over the cores of runs that finished, if
    that makes the steps faster.

    On idle cores a second thread makes a step ~1.5x faster; on cores that other programs keep busy
    it can make it 10x slower (the threads wait for each other), so more threads are tried for a few
    steps and kept only if they pay.
    """

    TRIAL_STEPS = 5

    def __init__(self, shared: SharedProgress) -> None:
        self.shared = shared
        self.started = 0.0
        self.recent: list[float] = []  # seconds of the last steps at the current thread count
        self.trial: tuple[int, float] | None = None  # while trying more threads: the old count, its step
        self.settled = False  # a trial did not pay: keep the thread count

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.shared.steps.get_lock():
            self.shared.steps.value += 1
        self.record_step(time.perf_counter() - self.started)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A task's training is over: an unjudged trial is undone, and the next task (whose steps may
        cost more) is timed afresh."""
        if self.trial is not None:
            torch.set_num_threads(self.trial[0])
            self.trial = None
        self.recent = []

    def record_step(self, seconds: float) -> None:
        """Note a step's duration; start, judge or skip a trial of more threads."""
        self.recent = [*self.recent, seconds][-self.TRIAL_STEPS :]
        if len(self.recent) < self.TRIAL_STEPS:
            return
        step = sum(self.recent) / len(self.recent)
        if self.trial is not None:
            threads, before = self.trial
            self.trial = None
            if step > 0.9 * before:  # not faster: the cores are not free after all
                torch.set_num_threads(threads)
                self.settled = True
            self.recent = []
            return
        wanted = self.shared.threads_for_me()
        if not self.settled and wanted > torch.get_num_threads():
            self.trial = (torch.get_num_threads(), step)
            self.recent = []
            torch.set_num_threads(wanted)


def _stream_process(
    name: str, peft_config: Any, options: DemoOptions, shared: SharedProgress, base_path: str, spawned: float
) -> None:
    """One stream in a child process: load the base, train, leave results in the run's folder."""
    from .easyvqa.pretrain import load_base

    startup = time.time() - spawned  # the interpreter and the imports of the child
    torch.set_num_threads(shared.threads_for_me())
    base, processor = load_base(base_path)
    quiet = replace(options, progress=False)
    try:
        _, seconds, parameters = _run_stream(
            name, peft_config, base, processor, demo_tasks(options), quiet, shared
        )
    finally:
        with shared.finished.get_lock():
            shared.finished.value += 1
    summary = {"seconds": seconds, "adapter_parameters": parameters, "startup_seconds": round(startup, 1)}
    write_atomically(os.path.join(options.output_dir, _slug(name), RUN_FILE), json.dumps(summary))


def _run_in_parallel(
    runs: dict[str, Any], options: DemoOptions, base_path: Path
) -> dict[str, tuple[ContinualResult, dict[str, Any]]]:
    """Both streams at once, one process each with half the cores, under one progress bar.

    A tiny model's training step gains little from a second thread (1.5x on 2 cores), so two
    single-threaded streams side by side finish sooner than one after the other; when one run
    finishes, the other takes over its cores. Returns each run's result and timing summary.
    """
    import multiprocessing

    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked OpenMP state
    shared = SharedProgress(context.Value("i", 0), context.Value("i", 0), len(runs), os.cpu_count() or 2)
    counter = shared.steps
    spawned = time.time()
    processes = {
        name: context.Process(
            target=_stream_process,
            args=(name, config, options, shared, str(base_path), spawned),
            name=f"cmoe demo: {name}",
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
            outcomes[name] = (ContinualResult.load(folder), json.load(handle))
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
        ("open-set rate (located in none)", lambda r: _percent(r.open_set_rate)),
    )
    for label, value in summary:
        lines.append(f"| {label} | " + " | ".join(value(results[n]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def _write_report(report: dict[str, Any], results: dict[str, ContinualResult], output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    write_atomically(os.path.join(output_dir, "results.json"), json.dumps(report, indent=2))
    options = report["options"]
    note = f"**{report['note']}**\n\n" if "note" in report else ""
    markdown = (
        f"# cmoe demo: easy-vqa, {options['tasks']} tasks, {options['steps']} steps x "
        f"{options['batch_size']} per task, {options['test_questions']} test questions per task\n\n"
        + note
        + f"Base: {report['base']['about']}.\n\n"
        "Accuracy (%) on each task (columns) after training each task (rows); tasks are located by "
        "the continual MoE's locator, never given.\n\n"
        + report["table"]
        + f"\nWall time: {report['seconds']:.0f} s "
        f"(base {report['base_seconds']:.0f} s).\n"
    )
    write_atomically(os.path.join(output_dir, "results.md"), markdown)
    save_heatmaps(results, os.path.join(output_dir, "results.png"))


def build_parser() -> argparse.ArgumentParser:
    """The flags; those `--fast` changes default to None (`options_from` fills them in)."""
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(
        prog="cmoe demo",
        description="Continual VQA on easy-vqa with a tiny LLaVA on CPU: sequential LoRA (forgets) "
        "against the continual mixture of LoRA experts (does not).",
    )
    parser.add_argument("--tasks", type=int, help=f"tasks of the stream, 2-4 (default {defaults.tasks})")
    parser.add_argument("--steps", type=int, help=f"training steps per task (default {defaults.steps})")
    parser.add_argument("--train-questions", type=int, help=f"per task (default {defaults.train_questions})")
    parser.add_argument("--test-questions", type=int, help=f"per task (default {defaults.test_questions})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="data and training; with --pretrain-base the base too"
    )
    parser.add_argument("--output-dir", default=defaults.output_dir, help="results and adapters go here")
    parser.add_argument(
        "--preset", choices=PRESETS, default=defaults.preset, help="the continual MoE's method"
    )
    parser.add_argument(
        "--pretrain-base",
        action="store_true",
        help="pretrain the base here with --seed (~2.5 min on 2 cores, then cached) instead of using the "
        "one shipped with the package",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where --pretrain-base caches bases (default: $CMOE_ADAPTERS_CACHE or ~/.cache/cmoe_adapters)",
    )
    fast = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in FAST_OVERRIDES.items())
    parser.add_argument(
        "--fast",
        action="store_true",
        help="check that everything runs (base pretraining, both streams, the report) in ~25 s on 2 "
        f"cores: {fast}, a base pretrained for a few steps in a temporary directory; the numbers mean "
        "nothing",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the two streams one after the other, in this process (bit-reproducible; side by side, "
        "a stream's thread count changes when the other finishes, which changes float rounding)",
    )
    return parser


def options_from(args: argparse.Namespace) -> DemoOptions:
    """The options of parsed flags: `--fast`'s or the usual defaults, under the flags given."""
    given = {
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "output_dir": args.output_dir,
        "preset": args.preset,
        "cache_dir": args.cache_dir,
        "progress": not args.quiet,
        "parallel": not args.sequential,
        "pretrain_base": args.pretrain_base,
    }
    for name in FAST_OVERRIDES:
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    return fast_options(**given) if args.fast else DemoOptions(**given)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cmoe demo`` and ``python -m cmoe_adapters.demo``; returns the exit code."""
    options = options_from(build_parser().parse_args(argv))
    problems = options.problems()
    if problems:
        print("cmoe demo: " + "; ".join(problems), file=sys.stderr)
        return 2
    report = run_demo(options)
    print("\n" + report["table"])
    seconds, base_seconds = report["seconds"], report["base_seconds"]
    print(f"base: {report['base']['about']}")
    print(f"wall time {seconds:.0f} s (base {base_seconds:.0f} s); results in {options.output_dir}/")
    if options.fast:
        print(FAST_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
