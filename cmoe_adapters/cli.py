"""The ``cmoe`` command line: real runs from a YAML run file, without writing a script.

``cmoe train RUN.yaml`` trains a stream of tasks with `ContinualMoETrainer`; ``cmoe eval`` scores a
trained adapter on the run file's eval sets, with every task located; ``cmoe locate`` says which
task the adapter's locator picks for each record of a data file; ``cmoe push`` pushes a finished
output directory to the Hub, one tagged commit per task; ``cmoe demo`` runs the embedded CPU demo.

The run file is validated completely (see `run_config`) and the data files are read and checked
before any model is loaded, so a typo costs seconds, not the time it takes to load a 7B model.

Exit codes: 0 done; 1 the command ran but some of its work failed (a push that is still pending);
2 the input is wrong (usage, run file, data file, adapter or output directory); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .config import ContinualMoEConfig
from .data import (
    DataError,
    VisionLanguageCollator,
    load_coin_test_records,
    load_llava_records,
    read_json_records,
    reference_answer,
)
from .run_config import ConfigError, RunConfig, find_run_file, load_run_config, recipe_names

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """A problem with what the user gave; printed without a traceback, exit code 2."""


# -- data ------------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    """``"llava"`` (conversations) or ``"coin"`` (``text`` + ``answer``), from the file's first record."""
    records = read_json_records(path)
    if not records:
        raise DataError(f"{path}: the file holds no records.")
    first = records[0]
    if isinstance(first, dict) and "conversations" in first:
        return "llava"
    if isinstance(first, dict) and {"text", "answer"} <= set(first):
        return "coin"
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise DataError(
        f"{path}: record 0 ({keys}) is neither LLaVA ('conversations') nor CoIN ('text', 'answer'): "
        "set the format explicitly."
    )


def load_records(
    path: str, fmt: str = "auto", image_root: str | None = None, *, evaluation: bool = False
) -> tuple[list[dict[str, Any]], str]:
    """Records of a data file and the format read; images resolve against `image_root`.

    Without `image_root`, relative image paths resolve against the data file's directory. For
    evaluation, LLaVA conversations get an ``answer`` (their last assistant turn) to score against.
    """
    fmt = detect_format(path) if fmt == "auto" else fmt
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if fmt == "llava":
        records = load_llava_records(path, image_root=root)
        if evaluation:
            records = [{**r, "answer": reference_answer(r)} for r in records]
    else:
        records = load_coin_test_records(path, image_root=root)
    if not records:
        raise DataError(f"{path}: the file holds no records.")
    return records, fmt


def _task_data(config: RunConfig, purpose: str) -> dict[str, dict[str, Any]]:
    """``{task: {"train": records, "eval": records, "train_format": .., "eval_format": ..}}``."""
    loaded: dict[str, dict[str, Any]] = {}
    for spec in config.tasks:
        entry: dict[str, Any] = {"train": None, "eval": None}
        kinds = ("train", "eval") if purpose == "train" else ("eval",)
        for kind in kinds:
            path = getattr(spec, kind)
            if path is None:
                continue
            if spec.benchmark is not None:  # the benchmark's released layout, every field its scorer reads
                from .benchmarks import load_benchmark_split

                split = "test" if kind == "eval" else "train"
                records = load_benchmark_split(spec.benchmark, spec.name, path, spec.image_root, split)
                fmt = spec.benchmark
            else:
                records, fmt = load_records(
                    path, getattr(spec, f"{kind}_format"), spec.image_root, evaluation=kind == "eval"
                )
            entry[kind], entry[f"{kind}_format"] = records, fmt
        loaded[spec.name] = entry
    return loaded


# -- models ----------------------------------------------------------------------------------------


def load_base_model(
    name: str,
    model_class: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    token: str | None = None,
) -> tuple[Any, Any]:
    """The base model and its processor (``model_class="auto"``: AutoModelForImageTextToText)."""
    import torch
    import transformers

    cls = (
        transformers.AutoModelForImageTextToText
        if model_class == "auto"
        else getattr(transformers, model_class)
    )
    options: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "token": token}
    try:
        model = cls.from_pretrained(
            name, dtype="auto" if dtype == "auto" else getattr(torch, dtype), **options
        )
        processor = transformers.AutoProcessor.from_pretrained(name, **options)
    except Exception as error:  # not found, gated, no weights, unknown architecture: all the user's to fix
        raise CommandError(f"cannot load the model {name!r}: {type(error).__name__}: {error}") from error
    return model, processor


def looks_like_a_path(name: str) -> bool:
    """Whether `name` can only mean a local path (a Hub id is ``name`` or ``owner/name``)."""
    head = name.split("/")[0]
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (head != name and os.path.isdir(head))


def adapter_config(adapter: str, revision: str | None, token: str | None) -> ContinualMoEConfig:
    """The adapter's saved config, read before any model loads (a wrong path fails in a second)."""
    from peft import PeftConfig

    where = f"{adapter}@{revision}" if revision else adapter
    if not os.path.exists(adapter) and looks_like_a_path(adapter):
        raise CommandError(f"the adapter directory {os.path.abspath(adapter)} does not exist.")
    try:
        config = PeftConfig.from_pretrained(adapter, revision=revision, token=token)
    except Exception as error:  # no such directory or repo, no adapter_config.json, no access
        raise CommandError(f"cannot read the adapter {where!r}: {type(error).__name__}: {error}") from error
    if not isinstance(config, ContinualMoEConfig):
        raise CommandError(f"{where} is a {config.peft_type} adapter, not a cmoe_adapters one.")
    return config


def _load_adapter(base: Any, adapter: str, revision: str | None, token: str | None) -> Any:
    """The trained continual adapter on `base`, in inference mode."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter, revision=revision, token=token)
    except Exception as error:
        where = f"{adapter}@{revision}" if revision else adapter
        raise CommandError(f"cannot load the adapter {where!r}: {type(error).__name__}: {error}") from error


def _device(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    return "cuda" if torch.cuda.is_available() else "cpu"


def _none_label(config: Any) -> str:
    """How the summaries name the "none of the learnt tasks" column."""
    return "none (base model)" if getattr(config, "locator_open_set", "base") == "base" else "none"


def _open_set_words(config: Any) -> str:
    """What the open-set rate counts, after the number."""
    base = getattr(config, "locator_open_set", "base") == "base"
    return " of the learnt tasks' records located in none of them" + (
        " (the base model answers those)" if base else ""
    )


def _confusion_rows(
    truth: Sequence[str], located: Sequence[str | None], known: Sequence[str]
) -> dict[str, list[int]]:
    """Counts per true task (in the order they come) over the columns ``known`` + none."""
    column = {name: i for i, name in enumerate(known)}
    rows: dict[str, list[int]] = {}
    for true, where in zip(truth, located, strict=True):
        row = rows.setdefault(true, [0] * (len(known) + 1))
        row[len(known) if where is None else column[where]] += 1
    return rows


def _confusion_table(rows: dict[str, list[int]], known: Sequence[str], none: str) -> list[str]:
    """The locator's confusion as text, in % of each true task's records.

    ``correct``: located to its own task, or for a task the adapter has not learnt (marked ``*``)
    located in none of them.
    """
    labels = {name: name if name in known else f"{name}*" for name in rows}
    width = max(len("true task"), len("all"), *map(len, labels.values()))
    widths = [max(7, len(name)) for name in (*known, none)]
    header = f"{'true task':<{width}}  records  " + "  ".join(
        f"{name:>{w}}" for name, w in zip((*known, none), widths, strict=True)
    )
    lines = [header + "  correct"]
    total_row, total_correct = [0] * (len(known) + 1), 0
    for name, row in rows.items():
        correct = row[known.index(name)] if name in known else row[-1]
        total_row = [a + b for a, b in zip(total_row, row, strict=True)]
        total_correct += correct
        lines.append(_confusion_line(labels[name], width, row, widths, correct))
    lines.append(_confusion_line("all", width, total_row, widths, total_correct))
    if any(name not in known for name in rows):
        lines.append(f"* not learnt by the adapter: correct = located in {none}")
    return lines


def _confusion_line(label: str, width: int, row: Sequence[int], widths: Sequence[int], correct: int) -> str:
    total = sum(row)

    def share(n: int) -> str:
        return _percent(n / total if total else None)

    shares = "  ".join(f"{share(n):>{w}}" for n, w in zip(row, widths, strict=True))
    return f"{label:<{width}}  {total:>7}  {shares}  {share(correct):>7}"


# -- train -----------------------------------------------------------------------------------------


def _check_output_dir(config: RunConfig, resume: bool) -> list[str]:
    """Finished tasks already in output_dir; refuse to overwrite them without --resume."""
    from .results import RESULTS_JSON, ContinualResult

    root = config.output_dir
    if not root or not os.path.isfile(os.path.join(root, RESULTS_JSON)):
        return []
    finished = ContinualResult.load(root).tasks
    if not finished:
        return []
    names = [task.name for task in config.tasks]
    if not resume:
        raise CommandError(
            f"{root} already holds finished tasks {finished}: pass --resume to continue the stream, "
            "or choose another training.output_dir."
        )
    if names[: len(finished)] != finished:
        raise CommandError(
            f"{root} holds tasks {finished}, which do not start this run's stream {names}: use the same "
            "task order or another training.output_dir."
        )
    return finished


def _plan(config: RunConfig, data: dict[str, dict[str, Any]], finished: Sequence[str]) -> str:
    """The resolved run, as the dry run prints it."""
    adapter = config.adapter_config()
    where = "local directory" if config.model_is_local else "Hub"
    lines = [
        f"run file  {config.path}",
        f"model     {config.model} ({where}; class {config.model_class}; dtype {config.dtype}"
        + (f"; revision {config.model_revision}" if config.model_revision else "")
        + ")",
        f"adapter   {'preset ' + config.preset if config.preset else 'ContinualMoEConfig'}: "
        + ", ".join(
            f"{name}={getattr(adapter, name)}"
            for name in ("r", "lora_alpha", "num_experts", "top_k", "experts_per_task")
        ),
        "          "
        + ", ".join(
            f"{name}={getattr(adapter, name)}"
            for name in (
                "expansion",
                "dual_router",
                "momentum_merge",
                "freeze_old_experts",
            )
        ),
        "locator   "
        + ", ".join(
            f"{name}={getattr(adapter, name)}"
            for name in (
                "locator_feature_source",
                "locator_pooling",
                "locator_density",
                "locator_open_set",
                "locator_open_set_fence",
            )
        ),
        "training  " + ", ".join(f"{k}={v}" for k, v in config.training.items()),
        f"tasks     {len(config.tasks)}, in this order:",
    ]
    for index, spec in enumerate(config.tasks, 1):
        entry = data[spec.name]
        parts = []
        for kind in ("train", "eval"):
            if entry.get(kind) is not None:
                parts.append(
                    f"{kind} {len(entry[kind])} {entry[f'{kind}_format']} records ({getattr(spec, kind)})"
                )
        state = "  [finished, restored on --resume]" if spec.name in finished else ""
        lines.append(f"  {index}. {spec.name}{state}")
        lines += [f"       {part}" for part in parts or ["no data"]]
        lines.append(f"       scored by {spec.metric}")
        if spec.training:
            lines.append("       own training: " + ", ".join(f"{k}={v}" for k, v in spec.training.items()))
    out = config.output_dir
    lines.append(f"output    {out}/<task> after each task, {out}/results.json|md")
    if config.training.get("push_to_hub"):
        lines.append(
            f"hub       push every task to {config.training.get('hub_model_id') or os.path.basename(out)}"
        )
    lines.append("dry run: the run file and the data files are valid; no model was loaded.")
    return "\n".join(lines)


def _train_config(args: argparse.Namespace) -> RunConfig:
    """The run file (or shipped recipe) named on the command line, with its overrides; --tiny's too."""
    path = find_run_file(args.config)
    output_dir = args.output_dir
    if args.tiny:
        from .tiny_run import TINY_TRAINING, tiny_config, tiny_output_dir

        config = load_run_config(
            path, "train", hardware_checks=False, data_root=args.data_root, training_overrides=TINY_TRAINING
        )
        config.training["output_dir"] = (
            os.path.abspath(output_dir) if output_dir else tiny_output_dir(config.training["output_dir"])
        )
        return tiny_config(config)
    return load_run_config(
        path, "train", hardware_checks=not args.dry_run, data_root=args.data_root, output_dir=output_dir
    )


def _base_model(config: RunConfig, data: dict[str, dict[str, Any]], tiny: bool) -> tuple[Any, Any]:
    if not tiny:
        return load_base_model(
            config.model, config.model_class, config.dtype, config.model_revision, config.trust_remote_code
        )
    from .tiny_run import tiny_base

    try:
        return tiny_base(config.model_class, data, seed=int(config.training.get("seed", 42)))
    except ValueError as error:
        raise CommandError(f"--tiny: {error}") from None


def cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    resume = bool(args.resume)
    finished = _check_output_dir(config, resume)
    data = _task_data(config, "train")
    if args.tiny:
        from .tiny_run import tiny_data

        data = tiny_data(data)
    if args.dry_run:
        print(_plan(config, data, finished))
        return EXIT_OK

    from peft import get_peft_model

    from . import hub
    from .trainer import ContinualMoETrainer, Task

    base, processor = _base_model(config, data, args.tiny)
    collator = VisionLanguageCollator(processor, max_length=config.max_length)
    model = get_peft_model(base, config.adapter_config())
    trainer = ContinualMoETrainer(
        model=model,
        args=config.training_arguments(),
        data_collator=collator,
        processing_class=processor,
    )
    tasks = [
        Task(
            spec.name,
            data[spec.name]["train"],
            data[spec.name]["eval"],
            metric=spec.metric,
            training_args=spec.training,
        )
        for spec in config.tasks
    ]
    result = trainer.train_tasks(tasks, resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        print("\n" + result.markdown())
        print(f"adapters and results in {config.output_dir}")
    pending = hub.read_pending(config.output_dir) if trainer.hub_target is not None else []
    if pending:
        print(
            f"pushes of {pending} are pending: retry with `cmoe push {config.output_dir} --hub-model-id "
            f"{trainer.hub_target.repo_id} --pending`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


# -- recipes ---------------------------------------------------------------------------------------


def cmd_recipes(args: argparse.Namespace) -> int:
    """Each shipped recipe's name, path and first comment line (what it reproduces)."""
    from .run_config import RECIPES_DIR

    names = recipe_names()
    width = max(map(len, names), default=0)
    for name in names:
        path = os.path.join(RECIPES_DIR, f"{name}.yaml")
        with open(path, encoding="utf-8") as handle:
            first = handle.readline().lstrip("# ").strip()
        print(f"{name:<{width}}  {first}")
    print(f"\nin {RECIPES_DIR}; run one with `cmoe train NAME --data-root DIR` (docs: Reproducing a paper)")
    return EXIT_OK


# -- eval ------------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_seen_tasks, generated_score
    from .metrics import locator_accuracy, open_set_rate

    config = load_run_config(find_run_file(args.config), "eval", data_root=args.data_root)
    data = _task_data(config, "eval")
    saved = adapter_config(args.adapter, args.revision, args.token)
    trained_on = saved.base_model_name_or_path
    if trained_on and trained_on != config.model:
        print(
            f"note: the adapter was trained on {trained_on}, the run file names {config.model}",
            file=sys.stderr,
        )
    base, processor = load_base_model(
        config.model,
        config.model_class,
        config.dtype,
        config.model_revision,
        config.trust_remote_code,
        args.token,
    )
    model = _load_adapter(base, args.adapter, args.revision, args.token)
    model.to(_device(args.device)).eval()
    known = list(model.tasks)
    skipped = {}
    for spec in config.tasks:
        if spec.name not in known:
            skipped[spec.name] = "the adapter has not learnt it"
        elif data[spec.name]["eval"] is None:
            skipped[spec.name] = "no eval file"
    evaluated = [spec.name for spec in config.tasks if spec.name not in skipped]
    if not evaluated:
        raise CommandError(
            f"no task of {args.config} can be evaluated: {skipped}; the adapter knows {known}."
        )

    collator = VisionLanguageCollator(processor, max_length=config.max_length)
    decode = getattr(processor, "batch_decode", None) or processor.tokenizer.batch_decode
    oracle = args.oracle or bool(config.training.get("eval_oracle"))

    metrics = {spec.name: spec.metric for spec in config.tasks}
    max_new_tokens = {
        spec.name: int(spec.training.get("eval_max_new_tokens", config.eval_max_new_tokens))
        for spec in config.tasks
    }

    def score(name: str, records: Sequence[Any]) -> float:
        return generated_score(
            model,
            records,
            collator,
            lambda tokens: decode(tokens, skip_special_tokens=True),
            metrics[name],
            batch_size=config.eval_batch_size,
            max_new_tokens=max_new_tokens[name],
        )

    evaluation = evaluate_seen_tasks(
        model,
        {name: data[name]["eval"] for name in evaluated},
        score,
        collator=collator,
        batch_size=config.eval_batch_size,
        oracle=oracle,
    )
    accuracy = dict(zip(evaluated, evaluation.scores, strict=True))
    oracle_accuracy = dict(zip(evaluated, evaluation.oracle or [], strict=False))
    confusion = evaluation.confusion  # the last column: located in none
    records_seen = sum(len(data[name]["eval"]) for name in evaluated)
    per_task_locator = {
        name: confusion[known.index(name)][known.index(name)] / max(1, sum(confusion[known.index(name)]))
        for name in evaluated
    }
    per_task_none = {
        name: confusion[known.index(name)][-1] / max(1, sum(confusion[known.index(name)]))
        for name in evaluated
    }
    average = sum(accuracy.values()) / len(accuracy)
    report = {
        "adapter": args.adapter,
        "revision": args.revision,
        "model": config.model,
        "tasks": evaluated,
        "accuracy": [accuracy[name] for name in evaluated],
        "metrics": [metrics[name] for name in evaluated],
        "average": average,
        "oracle_accuracy": [oracle_accuracy[name] for name in evaluated] if oracle else None,
        "oracle_average": sum(oracle_accuracy.values()) / len(oracle_accuracy) if oracle else None,
        "locator_accuracy": locator_accuracy(confusion),
        "locator_accuracy_per_task": [per_task_locator[name] for name in evaluated],
        "open_set_rate": open_set_rate(confusion),
        "open_set_rate_per_task": [per_task_none[name] for name in evaluated],
        "locator_confusion": {"tasks": known, "columns": [*known, None], "counts": confusion},
        "skipped": skipped,
    }

    width = max(len("average"), *map(len, evaluated))
    metric_width = max(len("metric"), *(len(metrics[name]) for name in evaluated))
    header = (
        f"{'task':<{width}}  {'metric':<{metric_width}}  located"
        + ("   oracle" if oracle else "")
        + "  locator     none"
    )
    lines = [header]
    for name in evaluated:
        cells = f"{_percent(accuracy[name]):>7}" + (
            f"  {_percent(oracle_accuracy[name]):>7}" if oracle else ""
        )
        locator = f"{_percent(per_task_locator[name]):>7}  {_percent(per_task_none[name]):>7}"
        lines.append(f"{name:<{width}}  {metrics[name]:<{metric_width}}  {cells}  {locator}")
    cells = f"{_percent(average):>7}" + (f"  {_percent(report['oracle_average']):>7}" if oracle else "")
    locator = f"{_percent(report['locator_accuracy']):>7}  {_percent(report['open_set_rate']):>7}"
    lines.append(f"{'average':<{width}}  {'':<{metric_width}}  {cells}  {locator}")
    print(f"scores in % on {records_seen} records, tasks located by the adapter ({args.adapter}):")
    print("\n".join(lines))
    print(f"locator accuracy: {_percent(report['locator_accuracy'])}%")
    print(f"open-set rate: {_percent(report['open_set_rate'])}%{_open_set_words(saved)}")
    print("locator confusion, in % of each task's records (rows: the true task; columns: located):")
    rows = {name: confusion[known.index(name)] for name in evaluated}
    print("\n".join(_confusion_table(rows, known, _none_label(saved))))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if args.output:
        from .results import write_atomically

        write_atomically(args.output, json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return EXIT_OK


# -- locate ----------------------------------------------------------------------------------------


def _print_open_set_checks(not_learnt: dict[str, dict[str, Any]], config: Any) -> None:
    """How well the novelty score flags each not-learnt task's records (`metrics.open_set_check`)."""
    for name, entry in not_learnt.items():
        if "auroc" not in entry:  # no locator scores (a one-task adapter)
            continue
        print(f"{name}* (not learnt): novelty AUROC {entry['auroc']:.3f} against the learnt tasks' records")
        flagged, fence = _percent(entry["flagged_at_suggested_fence"]), entry["suggested_fence"]
        print(
            f"  {flagged}% beyond fence {fence:.2f}, the smallest that keeps 99% of the learnt tasks' "
            f"records (locator_open_set_fence: {config.locator_open_set_fence:g})"
        )


def cmd_locate(args: argparse.Namespace) -> int:
    from .evaluation import locate_records
    from .metrics import confusion_matrix, locator_accuracy, open_set_check, open_set_rate

    if args.image_root is not None and not os.path.isdir(args.image_root):
        raise CommandError(f"--image-root: directory not found: {args.image_root}")
    true_tasks = args.task or []
    if true_tasks and len(true_tasks) != len(args.data):
        raise CommandError(
            f"{len(args.data)} --data but {len(true_tasks)} --task: give one --task (the true task of "
            "its records) per --data, in the same order, or none."
        )
    records: list[dict[str, Any]] = []
    sources: list[int] = []  # which --data each record came from
    for number, path in enumerate(args.data):
        loaded, _ = load_records(path, args.format, args.image_root, evaluation=False)
        records += loaded
        sources += [number] * len(loaded)
    saved = adapter_config(args.adapter, args.revision, args.token)
    model_name = args.model or saved.base_model_name_or_path
    if not model_name:
        raise CommandError(f"{args.adapter} does not name its base model: pass --model.")
    base, processor = load_base_model(model_name, args.model_class, args.dtype, token=args.token)
    model = _load_adapter(base, args.adapter, args.revision, args.token)
    model.to(_device(args.device)).eval()
    known = list(model.tasks)
    located = locate_records(model, records, VisionLanguageCollator(processor), args.batch_size)
    tasks, none = located.tasks, _none_label(saved)
    truth = [true_tasks[number] for number in sources] if true_tasks else None

    counts = Counter(tasks)
    report: dict[str, Any] = {
        "adapter": args.adapter,
        "revision": args.revision,
        "data": args.data,
        "records": len(tasks),
        "tasks": known,
        "located": {name: counts.get(name, 0) for name in known},
        "none": counts.get(None, 0),
        "unknown": sum(located.unknown),
    }
    if truth is not None:
        learnt = [(true, where) for true, where in zip(truth, tasks, strict=True) if true in known]
        confusion = confusion_matrix([t for t, _ in learnt], [w for _, w in learnt], known)
        rows = _confusion_rows(truth, tasks, known)
        report.update(
            {
                "true_tasks": true_tasks,
                "locator_accuracy": locator_accuracy(confusion),
                "locator_accuracy_per_task": {
                    name: row[known.index(name)] / sum(row) for name, row in rows.items() if name in known
                },
                "open_set_rate": open_set_rate(confusion),
                "locator_confusion": {"tasks": known, "columns": [*known, None], "counts": confusion},
                "not_learnt": {
                    name: {"records": sum(row), "located_none": row[-1] / sum(row)}
                    for name, row in rows.items()
                    if name not in known
                },
            }
        )
        # how well the novelty score flags each not-learnt task's records (needs a locator's scores)
        novelty = located.novelty
        learnt_novelty = [
            v for v, true in zip(novelty, truth, strict=True) if true in known and v is not None
        ]
        for name, entry in report["not_learnt"].items():
            theirs = [v for v, true in zip(novelty, truth, strict=True) if true == name and v is not None]
            if learnt_novelty and theirs:
                entry.update(open_set_check(learnt_novelty, theirs))

    if args.summary:
        where = ", ".join(args.data)
        print(f"{len(tasks)} records of {where}, located by {args.adapter}:")
        for name, count in [*report["located"].items(), (none, report["none"])]:
            print(f"  {name}: {count} ({_percent(count / len(tasks))}%)")
        if report["unknown"] != report["none"]:  # locator_open_set="nearest" routes them anyway
            print(f"  outside every task's fence (routed to their nearest task): {report['unknown']}")
        if truth is not None:
            print("locator confusion in % of each true task's records (columns: located to):")
            print("\n".join(_confusion_table(rows, known, none)))
            print(f"locator accuracy: {_percent(report['locator_accuracy'])}% (records of learnt tasks)")
            print(f"open-set rate: {_percent(report['open_set_rate'])}%{_open_set_words(saved)}")
            _print_open_set_checks(report["not_learnt"], saved)
    else:
        for index, record in enumerate(records):
            line: dict[str, Any] = {"index": index}
            for key in ("id", "question_id"):
                if key in record:
                    line[key] = record[key]
            if len(args.data) > 1:
                line["data"] = args.data[sources[index]]
            if truth is not None:
                line["true_task"] = truth[index]
            line["task"] = tasks[index]  # null: none of the learnt tasks
            line["unknown"] = located.unknown[index]
            line["novelty"] = None if located.novelty[index] is None else round(located.novelty[index], 4)
            if args.probabilities:
                line["probabilities"] = {
                    name: round(p, 6) for name, p in zip(known, located.probabilities[index], strict=True)
                }
            print(json.dumps(line))
    if args.output:
        from .results import write_atomically

        write_atomically(args.output, json.dumps(report, indent=2))
        print(f"wrote {args.output}", file=sys.stderr if not args.summary else sys.stdout)
    return EXIT_OK


# -- push ------------------------------------------------------------------------------------------


def cmd_push(args: argparse.Namespace) -> int:
    from . import hub
    from .results import RESULTS_JSON, ContinualResult

    root = args.output_dir
    if not os.path.isdir(root):
        raise CommandError(f"{root}: no such directory.")
    if not os.path.isfile(os.path.join(root, RESULTS_JSON)):
        raise CommandError(f"{root} has no {RESULTS_JSON}: it is not the output_dir of a cmoe train run.")
    finished = ContinualResult.load(root).tasks
    pending = hub.read_pending(root)
    todo = [task for task in finished if task in pending] if args.pending else finished
    if not todo:
        print("nothing is pending." if args.pending else f"{root} has no finished task.")
        return EXIT_OK
    for task in todo:
        if not os.path.isfile(os.path.join(root, task, "adapter_config.json")):
            raise CommandError(f"{os.path.join(root, task)} holds no saved adapter.")

    target = hub.HubTarget(args.hub_model_id, token=args.token, private=args.private, branch=args.branch)
    report = hub.push_finished(target, root, todo, finished)
    for task, commit in report.pushed.items():
        print(f"pushed {task} -> {target.repo_id} (tag {task}, commit {commit[:10]})")
    if report.failure is None:
        return EXIT_OK
    task, error = report.failure
    print(f"cmoe push: task {task!r} failed: {type(error).__name__}: {error}", file=sys.stderr)
    print(
        f"still pending: {report.pending}; retry with "
        f"`cmoe push {root} --hub-model-id {args.hub_model_id} --pending`",
        file=sys.stderr,
    )
    return EXIT_FAILED


# -- demo ------------------------------------------------------------------------------------------


def cmd_demo(argv: Sequence[str]) -> int:
    """Hand every argument to ``cmoe_adapters.demo.main`` untouched."""
    try:
        from . import demo
    except ModuleNotFoundError as error:
        if error.name == f"{__package__}.demo":
            print("cmoe demo: this installation has no demo module.", file=sys.stderr)
        else:
            print(f"cmoe demo needs {error.name}: pip install 'cmoe-adapters[demo]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(demo.main(list(argv)) or 0)
    except SystemExit as exit:  # the demo's own argparse (--help, usage errors)
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE


# -- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmoe",
        description="Continual learning of vision-language models with mixtures of LoRA experts.",
        epilog="Exit codes: 0 done, 1 some work failed (a pending push), 2 invalid input. See docs/cli.md.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a stream of tasks from a YAML run file")
    train.add_argument("config", metavar="RUN.yaml", help="the run file (see docs/cli.md)")
    train.add_argument("--resume", action="store_true", help="continue a crashed or extended stream")
    train.add_argument(
        "--dry-run", action="store_true", help="validate the run file and data, print the plan, load no model"
    )
    train.add_argument(
        "--data-root", metavar="DIR", help="where the tasks' data paths resolve (a recipe's: your download)"
    )
    train.add_argument("--output-dir", metavar="DIR", help="instead of the run file's training.output_dir")
    train.add_argument(
        "--tiny",
        action="store_true",
        help="check the run end to end offline: a tiny random model of the same architecture, a few "
        "records and steps per task, no DeepSpeed or bf16 (scores mean nothing)",
    )
    train.set_defaults(handler=cmd_train)

    recipes = commands.add_parser("recipes", help="list the published setups shipped as run files")
    recipes.set_defaults(handler=cmd_recipes)

    evaluate = commands.add_parser("eval", help="score a trained adapter on the run file's eval sets")
    evaluate.add_argument("config", metavar="RUN.yaml")
    evaluate.add_argument(
        "--adapter", required=True, help="adapter directory (output_dir/<task>) or Hub repo id"
    )
    evaluate.add_argument("--data-root", metavar="DIR", help="where the tasks' data paths resolve")
    evaluate.add_argument("--revision", help="Hub revision of the adapter (a task's tag)")
    evaluate.add_argument("--oracle", action="store_true", help="also score with the true task given")
    evaluate.add_argument("--output", metavar="FILE.json", help="write the scores as JSON")
    evaluate.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    evaluate.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:1', ...")
    evaluate.set_defaults(handler=cmd_eval)

    locate = commands.add_parser("locate", help="which task the adapter's locator picks for each record")
    locate.add_argument("--adapter", required=True, help="adapter directory or Hub repo id")
    locate.add_argument("--model", help="base model (default: the one named in the adapter's config)")
    locate.add_argument(
        "--data",
        required=True,
        action="append",
        help="LLaVA or CoIN data file (.json or .jsonl); repeat it for several files",
    )
    locate.add_argument(
        "--task",
        action="append",
        help="the true task of the records of the --data at the same place (repeat it as --data): "
        "adds the locator's confusion, accuracy and open-set rate; a task the adapter has not learnt "
        "counts as correctly located in none",
    )
    locate.add_argument("--image-root", help="directory of relative image paths (default: the data file's)")
    locate.add_argument("--format", default="auto", choices=("auto", "llava", "coin"))
    locate.add_argument("--revision", help="Hub revision of the adapter")
    locate.add_argument("--probabilities", action="store_true", help="add p(task | record) to every line")
    locate.add_argument(
        "--summary",
        action="store_true",
        help="print counts per task (and 'none') instead of JSON lines; with --task also the confusion",
    )
    locate.add_argument("--output", metavar="FILE.json", help="write the counts (and confusion) as JSON")
    locate.add_argument("--batch-size", type=int, default=8)
    locate.add_argument("--model-class", default="auto")
    locate.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    locate.add_argument("--token", help="Hub token")
    locate.add_argument("--device", default="auto")
    locate.set_defaults(handler=cmd_locate)

    push = commands.add_parser("push", help="push the finished tasks of an output directory to the Hub")
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="training.output_dir of a cmoe train run")
    push.add_argument("--hub-model-id", required=True, help="the Hub repository, e.g. me/coin-cmoe")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    push.add_argument("--private", action="store_true", default=None, help="create the repository private")
    push.add_argument("--branch", default="main", help="the branch that holds the latest state")
    push.add_argument("--pending", action="store_true", help="only retry the pushes that failed")
    push.set_defaults(handler=cmd_push)

    commands.add_parser(
        "demo", help="the embedded CPU demo (arguments go to it: cmoe demo --help)", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cmoe`` with `argv` (default: the process's arguments); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after "demo" belongs to the demo, --help included
        return cmd_demo(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error argparse has already printed
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except (ConfigError, CommandError, DataError) as error:
        print(f"cmoe {args.command}: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"cmoe {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
