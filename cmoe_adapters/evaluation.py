"""Scoring generated answers: VQA-style normalised exact match, and the default evaluator.

The default evaluator reads the library's record format (``{"image", "question", "answer"}``),
asks the collator for prompt-only inputs, generates greedily with *no task given* (the locator
must pick it), and scores normalised exact match. A record's ``answer`` may be a list of accepted
answers (as in VQA v2); a prediction matching any of them counts.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from .data import reference_answer

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
        inputs = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in collator.generation_inputs(batch).items()
        }
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, task=task)
        answers.extend(decode(generated[:, inputs["input_ids"].shape[1] :]))
    return answers


def exact_match_accuracy(
    model: Any,
    records: Sequence[Mapping[str, Any]],
    collator: GenerationCollator,
    decode: Callable[[torch.Tensor], list[str]],
    **generation: Any,
) -> float:
    """Share of records whose greedy answer matches (normalised) their ``answer``."""
    if len(records) == 0:
        raise ValueError("Cannot evaluate on an empty data set.")
    predictions = generate_answers(model, records, collator, decode, **generation)
    hits = sum(exact_match(p, reference_answer(r)) for p, r in zip(predictions, records, strict=True))
    return hits / len(records)
