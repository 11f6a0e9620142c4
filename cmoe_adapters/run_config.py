"""Run files for the `cmoe` command line: the YAML schema and its validation.

A real run loads a model of several GB before it trains anything, so a typo in the run file must
be found before that, and every problem at once rather than one per attempt. `load_run_config`
reads the file, checks every key against the dataclass fields of `ContinualMoEConfig` and
`ContinualTrainingArguments` (so new fields are known without touching this module), checks the
type of every value, checks that every file and directory exists, and then builds the config and
the training arguments so that their own validation speaks too. Problems are reported with their
place in the file (``tasks[2].train (line 14): file not found: ...``). Nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import PRESETS, ContinualMoEConfig, validate_task_name
from .scorers import SCORERS, benchmark_metric, resolve_benchmark_task

# key -> one-line meaning; the order is the order of the documentation and of the dry-run plan
TOP_LEVEL_KEYS: dict[str, str] = {
    "model": "Hub id or local directory of the base vision-language model (required)",
    "model_class": "'auto' (AutoModelForImageTextToText) or a transformers class name",
    "model_revision": "Hub revision (branch, tag or commit) of the base model",
    "dtype": "'auto', 'float32', 'float16' or 'bfloat16'",
    "trust_remote_code": "allow the model's own code from the Hub",
    "data_root": "directory the tasks' relative data paths resolve against (a recipe's: your download)",
    "image_root": "directory that relative image paths of the data files are resolved against",
    "max_length": "longest tokenized sample: the question text is cut, never the answer or the image",
    "adapter": "ContinualMoEConfig fields, plus an optional preset",
    "training": "ContinualTrainingArguments fields; output_dir is required",
    "tasks": "the stream, in order (required)",
}
TASK_KEYS: dict[str, str] = {
    "name": "the task's name: a directory name and a Hub tag (required)",
    "train": "training data file, LLaVA conversations or CoIN records (.json or .jsonl)",
    "eval": "evaluation data file (optional; without it the task's column stays empty)",
    "train_format": "'auto' (default), 'llava' or 'coin'",
    "eval_format": "'auto' (default), 'llava' or 'coin'",
    "image_root": "this task's image directory (default: the top-level image_root)",
    "metric": "how its answers are scored: a benchmark's rule (docs/scorers.md), default exact_match",
    "benchmark": "CoIN, UCIT, MLLM-DCL or MLLM-ACL: read its released files; its metric is the default",
    "training": "this task's own epochs, steps, learning rate, batch or answer length (PER_TASK_ARGUMENTS)",
}
FORMATS = ("auto", "llava", "coin")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# written by training, never by hand
ADAPTER_STATE_FIELDS = ("task_records", "locator_feature_dim", "base_model_fingerprint")
# TrainingArguments fields holding paths, resolved against the run file's directory like the others
TRAINING_PATH_FIELDS = ("output_dir", "deepspeed")
# the recipes shipped with the package (`cmoe recipes`); `recipes/` in a clone is a link to them
RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
# TrainingArguments fields the continual trainer or the command line decides: (allowed value, why)
TRAINING_STEERED_FIELDS: dict[str, tuple[Any, str]] = {
    "eval_strategy": (
        "no",
        "the continual trainer evaluates every seen task after each task by itself; leave it out",
    ),
    "resume_from_checkpoint": (None, "use `cmoe train RUN.yaml --resume` instead"),
}


def _checkpointing_names() -> dict[str, str]:
    """Either name of activation checkpointing (renamed within transformers 5.x) -> the installed one."""
    from ._compat import checkpointing_argument

    field = next(iter(checkpointing_argument(True)))
    names = {}
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        names[name], names[f"{name}_kwargs"] = field, f"{field}_kwargs"
    return names


_CHECKPOINTING_NAMES = _checkpointing_names()
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A run file with problems; `problems` lists each one as ``where: what``."""

    def __init__(self, path: str, problems: Sequence[str]) -> None:
        self.path, self.problems = path, list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        super().__init__(f"{path}: {count}, nothing was loaded:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class TaskSpec:
    """One task of the run file, with absolute paths."""

    name: str
    train: str | None
    eval: str | None
    train_format: str = "auto"
    eval_format: str = "auto"
    image_root: str | None = None
    metric: str = "exact_match"
    benchmark: str | None = None
    training: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """A validated run file: what to load, how to adapt it, how to train it, and on what."""

    path: str
    model: str
    model_is_local: bool
    model_class: str = "auto"
    model_revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    data_root: str | None = None
    image_root: str | None = None
    max_length: int | None = None
    preset: str | None = None
    adapter: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    tasks: list[TaskSpec] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def adapter_config(self) -> ContinualMoEConfig:
        """The `ContinualMoEConfig` of the run (preset first, then the file's fields)."""
        return build_adapter_config(self.preset, self.adapter)

    def training_arguments(self, **overrides: Any):
        """The run's `ContinualTrainingArguments` (imported here: it pulls in the trainer)."""
        from .trainer import ContinualTrainingArguments

        return ContinualTrainingArguments(**{**self.training, **overrides})

    @property
    def output_dir(self) -> str | None:
        return self.training.get("output_dir")

    @property
    def eval_batch_size(self) -> int:
        return int(
            self.training.get("eval_batch_size") or self.training.get("per_device_eval_batch_size") or 8
        )

    @property
    def eval_max_new_tokens(self) -> int:
        return int(self.training.get("eval_max_new_tokens") or 16)


def build_adapter_config(preset: str | None, fields: Mapping[str, Any]) -> ContinualMoEConfig:
    """A preset's config with `fields` overriding it, or a plain config of `fields`."""
    return ContinualMoEConfig.from_preset(preset, **fields)


# -- types -----------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value that does not fit a field's type: what was expected, and the closest valid value."""

    def __init__(self, expected: str, suggestion: str | None = None) -> None:
        super().__init__(expected)
        self.expected, self.suggestion = expected, suggestion


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(hint: Any) -> str:
    """A field's type in words, for messages ("a number or null")."""
    if hint is type(None):
        return "null"
    if _is_union(hint):
        enums = [a for a in typing.get_args(hint) if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # 'IntervalStrategy | str': the str only means "the enum's value as a string"
            return _describe(enums[0])
        words = [_describe(arg) for arg in typing.get_args(hint)]
        return " or ".join(dict.fromkeys(words))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if len(hint) > 8:  # e.g. the 40 optimizers: the suggestion says more than the list
            return f"one of the {len(hint)} {hint.__name__} values"
        return "one of " + ", ".join(repr(member.value) for member in hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint is list or typing.get_origin(hint) is list:
        args = typing.get_args(hint)
        return f"a list of {_describe(args[0])} items" if args else "a list"
    if hint is dict or typing.get_origin(hint) is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """`value` checked against `hint` (numbers written like ``2e-4``, a string in YAML, become floats)."""
    if hint is Any or hint is object:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch(_describe(hint))
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            return _coerce(value, enums[0])
        for arg in args:
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch(_describe(hint))
    if typing.get_origin(hint) is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise _Mismatch(_describe(hint))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [member.value for member in hint]
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise _Mismatch(_describe(hint), close[0] if close else None)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(_describe(hint))
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(_describe(hint))
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            number = float(value)
            if math.isfinite(number):
                return number
        raise _Mismatch(_describe(hint))
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(_describe(hint))
    if hint is list or typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise _Mismatch(_describe(hint))
        args = typing.get_args(hint)
        if not args:
            return value
        try:
            return [_coerce(item, args[0]) for item in value]
        except _Mismatch:
            raise _Mismatch(_describe(hint)) from None
    if hint is dict or typing.get_origin(hint) is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch(_describe(hint))
    return value  # a type YAML cannot write (e.g. a config object): the constructor decides


def _init_fields(cls: type) -> dict[str, Any]:
    """The constructor fields of a dataclass and their resolved type hints."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def adapter_fields() -> dict[str, Any]:
    """The `ContinualMoEConfig` fields a run file may set (its own, not peft's bookkeeping)."""
    from peft import PeftConfig

    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    return {
        name: hint
        for name, hint in _init_fields(ContinualMoEConfig).items()
        if name not in inherited and name not in ADAPTER_STATE_FIELDS
    }


def training_fields() -> dict[str, Any]:
    """The `ContinualTrainingArguments` fields a run file may set."""
    from .trainer import ContinualTrainingArguments

    return _init_fields(ContinualTrainingArguments)


# -- the checker -----------------------------------------------------------------------------------


def _line_numbers(text: str) -> tuple[dict[str, int], list[str]]:
    """``"tasks[2].train" -> line`` for every key and list item (1-based), and the duplicated keys.

    YAML keeps the last of two equal keys without a word, which hides a typo'd override.
    """
    lines: dict[str, int] = {}
    duplicates: list[str] = []

    def walk(node: yaml.Node, where: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                inner = f"{where}.{name}" if where else str(name)
                if inner in lines:
                    duplicates.append(inner)
                lines[inner] = key.start_mark.line + 1
                walk(value, inner)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                inner = f"{where}[{index}]"
                lines[inner] = item.start_mark.line + 1
                walk(item, inner)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return lines, duplicates


class _Checker:
    """Collects every problem of one run file, each with its place in the file."""

    def __init__(self, path: str, lines: Mapping[str, int]) -> None:
        self.path, self.lines = path, lines
        self.base = os.path.dirname(os.path.abspath(path))
        self.data_base = self.base  # the data_root, once known
        self.data_unknown = False  # no usable data_root: data paths cannot be checked
        # a shipped recipe is read-only: its output_dir is made where it is run
        self.output_base = os.getcwd() if is_recipe(path) else self.base
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        place = where
        while place and place not in self.lines:  # a missing key: point at its parent
            place = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", place) if re.search(r"[.\[]", place) else ""
        line = f" (line {self.lines[place]})" if place in self.lines else ""
        self.problems.append(f"{where}{line}: {message}")

    def keys(self, where: str, mapping: Mapping[str, Any], known: Sequence[str], what: str) -> None:
        """Report keys that are not in `known`, with the closest known key as a suggestion."""
        for key in mapping:
            if key in known:
                continue
            inner = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" ({what})"
            self.problem(inner, "unknown key" + hint)

    def value(self, where: str, value: Any, hint: Any) -> tuple[bool, Any]:
        try:
            return True, _coerce(value, hint)
        except _Mismatch as mismatch:
            close = f" (did you mean {mismatch.suggestion!r}?)" if mismatch.suggestion else ""
            self.problem(where, f"expected {mismatch.expected}, got {value!r}{close}")
            return False, value

    def resolve(self, value: str, base: str | None = None) -> str:
        return os.path.normpath(os.path.join(base or self.base, os.path.expanduser(value)))

    def existing(self, where: str, value: Any, kind: str, data: bool = False) -> str | None:
        """The absolute path of an existing file or directory (`kind`), or None after a problem.

        ``data=True``: a data path, resolved against the data_root (unchecked when it is unknown).
        """
        if not isinstance(value, str) or not value:
            self.problem(where, f"expected a path (a string), got {value!r}")
            return None
        if data and self.data_unknown:
            return None
        path = self.resolve(value, self.data_base if data else None)
        if kind == "file" and not os.path.isfile(path):
            self.problem(where, f"{'not a file' if os.path.isdir(path) else 'file not found'}: {path}")
            return None
        if kind == "path" and not os.path.exists(path):
            self.problem(where, f"file or folder not found: {path}")
            return None
        if kind == "dir" and not os.path.isdir(path):
            self.problem(
                where, f"{'not a directory' if os.path.exists(path) else 'directory not found'}: {path}"
            )
            return None
        return path

    def choice(self, where: str, value: Any, choices: Sequence[str]) -> bool:
        if value in choices:
            return True
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        self.problem(where, f"expected one of {', '.join(map(repr, choices))}, got {value!r}{suggestion}")
        return False


def _config_messages(error: Exception, fields: Sequence[str]) -> list[tuple[str, str]]:
    """Split ContinualMoEConfig's "Invalid ...:\\n  - r=0: ..." into ``(field or "", message)`` pairs."""
    text = str(error)
    items = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")] or [text]
    pairs = []
    for item in items:
        match = re.match(r"^(\w+)=", item)
        pairs.append((match.group(1) if match and match.group(1) in fields else "", item))
    return pairs


# -- sections --------------------------------------------------------------------------------------


def _check_model(check: _Checker, data: Mapping[str, Any], run: dict[str, Any]) -> None:
    model = data.get("model")
    if model is None:
        check.problem(
            "model", "missing required key (a Hub id such as llava-hf/llava-1.5-7b-hf, or a directory)"
        )
    elif not isinstance(model, str) or not model.strip():
        check.problem("model", f"expected a Hub id or a directory, got {model!r}")
    else:
        local = check.resolve(model)
        looks_local = os.path.isabs(os.path.expanduser(model)) or model.startswith((".", "~"))
        if os.path.isdir(local):
            if not os.path.isfile(os.path.join(local, "config.json")):
                check.problem("model", f"not a model directory (no config.json): {local}")
            run.update(model=local, model_is_local=True)
        elif looks_local or os.path.exists(local) or model.count("/") > 1:
            check.problem("model", f"directory not found: {local}")
        else:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(model)
                run.update(model=model, model_is_local=False)
            except HFValidationError as error:
                check.problem("model", f"neither a directory nor a valid Hub id: {error}")

    model_class = data.get("model_class", "auto")
    if check.value("model_class", model_class, str)[0] and model_class != "auto":
        import transformers

        try:
            found = getattr(transformers, model_class, None) if model_class.isidentifier() else None
        except Exception:  # a class whose backend is missing: as good as not there
            found = None
        if found is None or not hasattr(found, "from_pretrained"):
            check.problem(
                "model_class",
                f"transformers has no model class {model_class!r} "
                "(use 'auto' or a class name such as 'LlavaForConditionalGeneration')",
            )
    run["model_class"] = model_class
    for key, hint in (
        ("model_revision", str | None),
        ("trust_remote_code", bool),
        ("max_length", int | None),
    ):
        if key in data:
            ok, value = check.value(key, data[key], hint)
            if ok:
                run[key] = value
    if isinstance(run.get("max_length"), int) and run["max_length"] < 1:
        check.problem("max_length", f"must be >= 1, got {run['max_length']}")
    dtype = data.get("dtype", "auto")
    if check.choice("dtype", dtype, DTYPES):
        run["dtype"] = dtype
    if data.get("image_root") is not None:
        run["image_root"] = check.existing("image_root", data["image_root"], "dir", data=True)


def _check_data_root(
    check: _Checker, data: Mapping[str, Any], run: dict[str, Any], given: str | None
) -> None:
    """Where the data paths resolve: ``--data-root``, else the file's ``data_root``, else its folder."""
    if given is not None:
        root = os.path.abspath(os.path.expanduser(given))
        if not os.path.isdir(root):
            check.problem("data_root", f"--data-root: directory not found: {root}")
            root = None
    elif "data_root" not in data:
        return
    elif data["data_root"] is None:
        check.problem(
            "data_root",
            "not set: the tasks' data paths are relative to the benchmark's download; pass "
            "--data-root DIR (or set data_root: in a copy of the file)",
        )
        root = None
    else:
        root = check.existing("data_root", data["data_root"], "dir")
    if root is None:
        check.data_unknown = True
    else:
        check.data_base = run["data_root"] = root


def _check_adapter(check: _Checker, data: Any, run: dict[str, Any]) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        check.problem("adapter", f"expected a mapping of ContinualMoEConfig fields, got {data!r}")
        return
    before = len(check.problems)
    fields = adapter_fields()
    preset = data.get("preset")
    if preset is not None and check.choice("adapter.preset", preset, PRESETS[1:]):  # "default": leave it out
        run["preset"] = preset
    adapter: dict[str, Any] = {}
    for key, value in data.items():
        if key == "preset":
            continue
        if key in ADAPTER_STATE_FIELDS:
            check.problem(f"adapter.{key}", "is written by training (the adapter's state); leave it out")
        elif key not in fields:
            check.keys("adapter", {key: value}, [*fields, "preset"], "not a ContinualMoEConfig field")
        else:
            ok, coerced = check.value(f"adapter.{key}", value, fields[key])
            if ok:
                adapter[key] = coerced
    run["adapter"] = adapter
    if len(check.problems) == before:  # the config's own rules, only on well-typed fields
        try:
            build_adapter_config(run.get("preset"), adapter)
        except ValueError as error:
            for name, message in _config_messages(error, list(fields)):
                check.problem(f"adapter.{name}" if name else "adapter", message)


def _check_training(
    check: _Checker, data: Any, run: dict[str, Any], purpose: str, output_dir: str | None = None
) -> None:
    if data is None and output_dir is not None:
        data = {}
    if data is None:
        if purpose == "train":
            check.problem(
                "training", "missing required key (ContinualTrainingArguments fields; output_dir is required)"
            )
        return
    if not isinstance(data, dict):
        check.problem("training", f"expected a mapping of ContinualTrainingArguments fields, got {data!r}")
        return
    fields = training_fields()
    training: dict[str, Any] = {}
    typed = True
    for key, value in data.items():
        key = _CHECKPOINTING_NAMES.get(key, key)
        if key not in fields:
            check.keys("training", {key: value}, list(fields), "not a ContinualTrainingArguments field")
            typed = False
            continue
        if key in TRAINING_STEERED_FIELDS and value != TRAINING_STEERED_FIELDS[key][0]:
            check.problem(f"training.{key}", TRAINING_STEERED_FIELDS[key][1])
            typed = False
            continue
        ok, coerced = check.value(f"training.{key}", value, fields[key])
        typed &= ok
        if not ok:
            continue
        if key == "output_dir" and coerced:
            coerced = check.resolve(coerced, check.output_base)
        elif key in TRAINING_PATH_FIELDS and isinstance(coerced, str) and coerced:
            coerced = check.existing(f"training.{key}", coerced, "file")
            typed &= coerced is not None
        training[key] = coerced
    if output_dir is not None:
        training["output_dir"] = os.path.abspath(os.path.expanduser(output_dir))
    if purpose == "train" and not training.get("output_dir"):
        if "output_dir" not in data and output_dir is None:
            check.problem("training.output_dir", "missing required key (where every task's adapter is saved)")
        typed = False
    run["training"] = training
    if purpose == "train" and typed:
        _construct_training(check, training, run)


def _construct_training(check: _Checker, training: dict[str, Any], run: dict[str, Any]) -> None:
    """Let `ContinualTrainingArguments` check the values; report machine-dependent failures apart."""
    from .trainer import ContinualTrainingArguments

    def attempt(arguments: dict[str, Any]) -> str | None:
        try:
            ContinualTrainingArguments(**arguments)
        except Exception as error:  # any refusal of the arguments is a problem of the file
            return str(error).strip() or type(error).__name__
        return None

    message = attempt(training)
    if message is None:
        return
    machine: dict[str, Any] = {key: False for key in ("bf16", "fp16", "tf32") if training.get(key)}
    if training.get("deepspeed"):
        machine["deepspeed"] = None
    if machine and run.get("hardware_checks") is False and attempt({**training, **machine}) is None:
        run.setdefault("warnings", []).append(
            f"training: {message} (checked on a machine that cannot run {', '.join(machine)}; "
            "fine if the training machine can)"
        )
        return
    check.problem("training", message)


def _check_tasks(check: _Checker, data: Any, run: dict[str, Any], purpose: str) -> None:
    if data is None:
        check.problem("tasks", "missing required key (a list of {name, train, eval})")
        return
    if not isinstance(data, list) or not data:
        check.problem("tasks", f"expected a non-empty list of tasks, got {data!r}")
        return
    tasks: list[TaskSpec] = []
    first_seen: dict[str, int] = {}
    for index, item in enumerate(data):
        where = f"tasks[{index}]"
        if not isinstance(item, dict):
            check.problem(where, f"expected a mapping with name, train and eval, got {item!r}")
            continue
        check.keys(where, item, list(TASK_KEYS), "known: " + ", ".join(TASK_KEYS))
        name = item.get("name")
        if name is None:
            check.problem(f"{where}.name", "missing required key")
        else:
            try:
                validate_task_name(name)
            except ValueError as error:
                check.problem(f"{where}.name", str(error))
            else:
                if name in first_seen:
                    check.problem(
                        f"{where}.name", f"duplicate task name {name!r} (also tasks[{first_seen[name]}])"
                    )
                first_seen.setdefault(name, index)
        root = run.get("image_root")
        if item.get("image_root") is not None:
            root = check.existing(f"{where}.image_root", item["image_root"], "dir", data=True)
        paths: dict[str, str | None] = {}
        for key in ("train", "eval"):
            if item.get(key) is None:
                paths[key] = None
                if key == "train" and purpose == "train":
                    check.problem(f"{where}.train", "missing required key (the task's training data file)")
            elif key == "eval" or purpose == "train":
                # a benchmark's split may be named by its task folder: its released file is found there
                kind = "path" if item.get("benchmark") is not None else "file"
                paths[key] = check.existing(f"{where}.{key}", item[key], kind, data=True)
            else:  # evaluating: the training file may live on another machine
                paths[key] = check.resolve(str(item[key]), check.data_base)
        formats = {}
        for key in ("train_format", "eval_format"):
            value = item.get(key, "auto")
            formats[key] = value if check.choice(f"{where}.{key}", value, FORMATS) else "auto"
        metric = item.get("metric", "exact_match")
        benchmark = item.get("benchmark")
        if benchmark is not None and isinstance(name, str):
            try:  # the task's name is the benchmark's (any case, or an alias such as RefCOCO)
                benchmark, _ = resolve_benchmark_task(str(benchmark), name)
            except ValueError as error:
                check.problem(f"{where}.benchmark", str(error))
            else:
                formats["benchmark"] = benchmark
                metric = item.get("metric", benchmark_metric(benchmark, name))
        if check.choice(f"{where}.metric", metric, sorted(SCORERS)):
            formats["metric"] = metric
            lacking = SCORERS[metric].missing()
            if lacking and run.get("hardware_checks") is False:
                run.setdefault("warnings", []).append(
                    f"{where}.metric: {lacking} (fine if the machine that runs it has them)"
                )
            elif lacking:
                check.problem(f"{where}.metric", lacking)
        training = _task_training(check, f"{where}.training", item.get("training"))
        if isinstance(name, str):
            tasks.append(
                TaskSpec(name, paths["train"], paths["eval"], image_root=root, training=training, **formats)
            )
    run["tasks"] = tasks


def _task_training(check: _Checker, where: str, data: Any) -> dict[str, Any]:
    """A task's own `PER_TASK_ARGUMENTS` values (`Task.training_args`)."""
    if data is None:
        return {}
    from .trainer import PER_TASK_ARGUMENTS

    if not isinstance(data, dict):
        check.problem(where, f"expected a mapping of {', '.join(PER_TASK_ARGUMENTS)}, got {data!r}")
        return {}
    fields = training_fields()
    training = {}
    for key, value in data.items():
        if key not in PER_TASK_ARGUMENTS:
            close = difflib.get_close_matches(str(key), PER_TASK_ARGUMENTS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            check.problem(
                f"{where}.{key}",
                f"not a per-task setting ({hint}a task may set {', '.join(PER_TASK_ARGUMENTS)}; "
                "the rest belongs in the top-level training:)",
            )
            continue
        ok, coerced = check.value(f"{where}.{key}", value, fields[key])
        if ok:
            training[key] = coerced
    return training


def is_recipe(path: str) -> bool:
    """Whether `path` is one of the recipes shipped with the package (through any link to them)."""
    folder = os.path.realpath(RECIPES_DIR)
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == folder


def recipe_names() -> list[str]:
    """The shipped recipes, by name (``coin-llava15-7b`` for ``recipes/coin-llava15-7b.yaml``)."""
    if not os.path.isdir(RECIPES_DIR):
        return []
    return sorted(name[: -len(".yaml")] for name in os.listdir(RECIPES_DIR) if name.endswith(".yaml"))


def find_run_file(name: str) -> str:
    """`name` when it is a file, else the shipped recipe of that name (``cmoe train coin-llava15-7b``)."""
    if os.path.exists(name) or os.sep in name or name.endswith((".yaml", ".yml")):
        return name
    if name in recipe_names():
        return os.path.join(RECIPES_DIR, f"{name}.yaml")
    return name  # not found: load_run_config says so


def load_run_config(
    path: str,
    purpose: str = "train",
    hardware_checks: bool = True,
    *,
    data_root: str | None = None,
    output_dir: str | None = None,
    training_overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read and validate a run file; raises `ConfigError` listing every problem.

    `purpose` is ``"train"`` (training files and ``training.output_dir`` are required, the training
    arguments are built) or ``"eval"`` (only what evaluation needs must exist). With
    ``hardware_checks=False`` (a dry run on a machine without the run's GPU), mixed-precision and
    DeepSpeed settings this machine cannot run become warnings instead of problems.
    `data_root` and `output_dir` (relative to the current directory) replace the file's;
    `training_overrides` replace its ``training`` fields before they are checked (None removes one).
    """
    if purpose not in ("train", "eval"):
        raise ValueError(f"purpose must be 'train' or 'eval', got {purpose!r}")
    if not os.path.isfile(path):
        raise ConfigError(path, ["file not found" if not os.path.exists(path) else "not a file"])
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = yaml.safe_load(text)
        lines, duplicates = _line_numbers(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(path, [f"{where}not valid YAML ({problem})"]) from None
    if not isinstance(data, dict):
        raise ConfigError(
            path, [f"expected a mapping at the top (model:, adapter:, training:, tasks:), got {data!r}"]
        )

    check = _Checker(path, lines)
    for key in duplicates:
        check.problem(key, "duplicate key (YAML would silently keep only this last value)")
    run: dict[str, Any] = {"hardware_checks": hardware_checks}
    check.keys("", data, list(TOP_LEVEL_KEYS), "known: " + ", ".join(TOP_LEVEL_KEYS))
    _check_data_root(check, data, run, data_root)
    _check_model(check, data, run)
    _check_adapter(check, data.get("adapter"), run)
    training = data.get("training")
    if training_overrides and isinstance(training, dict):
        training = {**training, **training_overrides}
        training = {key: value for key, value in training.items() if value is not None}
    _check_training(check, training, run, purpose, output_dir)
    _check_tasks(check, data.get("tasks"), run, purpose)
    if check.problems:
        raise ConfigError(path, check.problems)
    run.pop("hardware_checks")
    return RunConfig(path=os.path.abspath(path), **run)
