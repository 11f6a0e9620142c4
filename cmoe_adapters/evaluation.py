"""Scoring generated answers, and evaluating every task seen so far (one implementation for all).

The default evaluator reads the library's record format (``{"image", "question", "answer"}``),
asks the collator for prompt-only inputs, generates greedily with *no task given* (the locator
must pick it), and scores normalised exact match. A record's ``answer`` may be a list of accepted
answers (as in VQA v2); a prediction matching any of them counts.

`evaluate_seen_tasks` is what `ContinualMoETrainer` runs after every task and what ``cmoe eval``
runs on a saved adapter: each task's score with its task located (what users get), with the true
task given (``oracle``), and the locator's confusion matrix (`locate_records`).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .metrics import confusion_matrix

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, spell numbers as digits, collapse spaces (VQA)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(_NUMBERS.get(word, word) for word in text.split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """Whether the normalised prediction equals the (or one of the) normalised answers."""
    candidates = [answers] if isinstance(answers, str) else list(answers)
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(answer) for answer in candidates)


class GenerationCollator(Protocol):
    """A collator that can also build prompt-only inputs for generation (see `data.py`)."""

    def generation_inputs(self, records: Sequence[Mapping[str, Any]]) -> Mapping[str, torch.Tensor]: ...


def _batches(dataset: Sequence[Any], batch_size: int) -> Iterable[list[Any]]:
    for start in range(0, len(dataset), batch_size):
        yield [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]


def _on_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def prompt_inputs(collator: Any, records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The model inputs of `records` as the model sees them when generating (prompt only).

    A collator without ``generation_inputs`` (e.g. one for pre-tokenised data) gives its training
    batch; the locator's feature pools the prompt tokens (not the labelled answer) of either.
    """
    build = getattr(collator, "generation_inputs", None)
    return build(records) if callable(build) else collator(records)


@torch.no_grad()
def generate_answers(
    model: Any,
    records: Sequence[Mapping[str, Any]],
    collator: GenerationCollator,
    decode: Callable[[torch.Tensor], list[str]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    task: str | None = None,
) -> list[str]:
    """Greedy answers for `records`; with ``task=None`` each sample's task is located."""
    answers: list[str] = []
    device = next(model.parameters()).device
    for batch in _batches(records, batch_size):
        inputs = _on_device(collator.generation_inputs(batch), device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, task=task)
        answers.extend(decode(generated[:, inputs["input_ids"].shape[1] :]))
    return answers


def generated_score(
    model: Any,
    records: Sequence[Mapping[str, Any]],
    collator: GenerationCollator,
    decode: Callable[[torch.Tensor], list[str]],
    metric: str = "exact_match",
    **generation: Any,
) -> float:
    """Greedy answers for `records`, scored by `metric`, a benchmark's own rule (`scorers.SCORERS`)."""
    from .scorers import score_predictions

    if len(records) == 0:
        raise ValueError("Cannot evaluate on an empty data set.")
    return score_predictions(
        metric, generate_answers(model, records, collator, decode, **generation), records
    )


def exact_match_accuracy(
    model: Any,
    records: Sequence[Mapping[str, Any]],
    collator: GenerationCollator,
    decode: Callable[[torch.Tensor], list[str]],
    **generation: Any,
) -> float:
    """Share of records whose greedy answer matches (normalised) their ``answer``."""
    return generated_score(model, records, collator, decode, "exact_match", **generation)


@dataclass
class LocatedRecords:
    """What the locator decided for a list of records (`locate_tasks(..., return_scores=True)`).

    ``tasks``: each record's task, ``None`` for none of the learnt tasks (the base model answers
    it under ``locator_open_set="base"``); ``probabilities``: ``p(task | record)`` rows;
    ``novelty``: the open-set score (higher = less like any learnt task; None without a fitted
    locator); ``unknown``: outside every task's fence (also under ``"nearest"``, which still routes).
    """

    tasks: list[str | None] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)
    novelty: list[float | None] = field(default_factory=list)
    unknown: list[bool] = field(default_factory=list)


@torch.no_grad()
def locate_records(model: Any, records: Sequence[Any], collator: Any, batch_size: int) -> LocatedRecords:
    """The locator's decision for every record, with its scores, from the prompt-only inputs."""
    device = next(model.parameters()).device
    located = LocatedRecords()
    for batch in _batches(records, batch_size):
        location = model.locate_tasks(
            **_on_device(prompt_inputs(collator, batch), device), return_scores=True
        )
        located.tasks += location.tasks
        located.probabilities += location.probabilities.float().tolist()
        located.novelty += [None if math.isnan(v) else v for v in location.novelty.float().tolist()]
        located.unknown += [bool(v) for v in location.unknown.tolist()]
    return located


@dataclass
class SeenTasksEvaluation:
    """Scores of the evaluated tasks (in the order given; ``None`` where a task has no eval set).

    ``oracle``: the same with each task's true task given (``None`` unless asked for);
    ``confusion``: the locator's counts, a row per known task and a column per known task plus a
    last one for records located in none of them (``None`` for a plain peft model).
    """

    tasks: list[str]
    scores: list[float | None]
    oracle: list[float | None] | None
    confusion: list[list[int]] | None


@torch.no_grad()
def evaluate_seen_tasks(
    model: Any,
    datasets: Mapping[str, Sequence[Any] | None],
    score: Callable[[str, Sequence[Any]], float],
    *,
    collator: Any,
    batch_size: int,
    oracle: bool = False,
) -> SeenTasksEvaluation:
    """Score every task of `datasets` with `score(name, records)`, the model in eval mode.

    The model locates each record's task (no task is given); with `oracle`, each task is scored
    again routed through its true task. A cmoe model's locator is also asked for every record
    (`locate_records`), which gives the confusion matrix over ``model.tasks``.
    """
    continual = callable(getattr(model, "locate_tasks", None))
    was_training = model.training
    model.eval()
    scores: list[float | None] = []
    oracle_scores: list[float | None] | None = [] if oracle and continual else None
    truth: list[str] = []
    located: list[str | None] = []
    try:
        for name, records in datasets.items():
            if records is None:
                scores.append(None)
                if oracle_scores is not None:
                    oracle_scores.append(None)
                continue
            scores.append(score(name, records))
            if oracle_scores is not None:
                with model.using_task(name):
                    oracle_scores.append(score(name, records))
            if continual:
                found = locate_records(model, records, collator, batch_size).tasks
                truth += [name] * len(found)
                located += found
    finally:
        model.train(was_training)
    confusion = confusion_matrix(truth, located, list(model.tasks)) if continual else None
    return SeenTasksEvaluation(list(datasets), scores, oracle_scores, confusion)
