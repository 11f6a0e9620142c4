"""Continual-learning metrics over an accuracy matrix, and the task locator's confusion matrix.

``acc[i][j]`` is the score on task ``j`` after training task ``i`` (``j <= i``: rows are ragged,
row ``i`` has ``i + 1`` entries). An entry may be ``None`` when a task has no evaluation set; such
entries are left out of every average rather than counted as zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import mean

AccuracyMatrix = Sequence[Sequence[float | None]]


def _check(acc: AccuracyMatrix) -> None:
    if not acc:
        raise ValueError("The accuracy matrix is empty: no task has been trained yet.")
    for i, row in enumerate(acc):
        if len(row) < i + 1:
            raise ValueError(f"Row {i} of the accuracy matrix has {len(row)} entries; it needs {i + 1}.")


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def final_average(acc: AccuracyMatrix) -> float | None:
    """Mean score over all tasks after the last one ("Last", MFN)."""
    _check(acc)
    return _mean(acc[-1][: len(acc)])


def mean_average_accuracy(acc: AccuracyMatrix) -> float | None:
    """MAA: the mean over training steps ``i`` of the average score on the tasks seen so far."""
    _check(acc)
    return _mean([_mean(row[: i + 1]) for i, row in enumerate(acc)])


def backward_transfer(acc: AccuracyMatrix) -> float | None:
    """BWT: mean over earlier tasks ``j`` of ``acc[T][j] - acc[j][j]`` (negative = forgetting).

    0.0 with a single task (nothing can be forgotten yet).
    """
    _check(acc)
    last = len(acc) - 1
    if last == 0:
        return 0.0
    return _mean(
        [None if acc[last][j] is None or acc[j][j] is None else acc[last][j] - acc[j][j] for j in range(last)]
    )


def forgetting(acc: AccuracyMatrix) -> float | None:
    """Average forgetting: mean over earlier tasks of (best score before the last task - final score)."""
    _check(acc)
    last = len(acc) - 1
    if last == 0:
        return 0.0
    drops = []
    for j in range(last):
        earlier = [acc[i][j] for i in range(j, last) if acc[i][j] is not None]
        drops.append(None if not earlier or acc[last][j] is None else max(earlier) - acc[last][j])
    return _mean(drops)


def confusion_matrix(
    true_tasks: Sequence[str], located_tasks: Sequence[str | None], tasks: Sequence[str]
) -> list[list[int]]:
    """``counts[i][j]``: samples of task ``tasks[i]`` that the locator sent to ``tasks[j]``.

    One more column than tasks: ``counts[i][-1]`` counts the samples it placed in none of the
    learnt tasks (located as ``None``: the base model answered them).
    """
    if len(true_tasks) != len(located_tasks):
        raise ValueError(f"{len(true_tasks)} true tasks but {len(located_tasks)} located ones.")
    index = {name: i for i, name in enumerate(tasks)}
    counts = [[0] * (len(tasks) + 1) for _ in tasks]
    for true, located in zip(true_tasks, located_tasks, strict=True):
        for name in (true, located):
            if name is not None and name not in index:
                raise KeyError(f"Unknown task {name!r}; known tasks: {list(tasks)}.")
        if true is None:
            raise ValueError("A sample's true task cannot be None.")
        counts[index[true]][len(tasks) if located is None else index[located]] += 1
    return counts


def locator_accuracy(counts: Sequence[Sequence[int]]) -> float | None:
    """Share of samples located to their own task (the confusion matrix's trace over its total)."""
    total = sum(map(sum, counts))
    return sum(counts[i][i] for i in range(len(counts))) / total if total else None


def open_set_rate(counts: Sequence[Sequence[int]]) -> float | None:
    """Share of learnt tasks' samples the locator placed in none of them (the extra last column).

    None for a square matrix (saved before the open set existed) or an empty one.
    """
    total = sum(map(sum, counts))
    if not total or any(len(row) != len(counts) + 1 for row in counts):
        return None
    return sum(row[-1] for row in counts) / total


def auroc(known: Sequence[float], unknown: Sequence[float]) -> float:
    """Area under the ROC curve of a novelty score: P(unknown scores higher than known), ties half.

    The threshold-free measure of an open-set decision: 1.0 separates every input of an unlearnt
    task from every input of a learnt one, 0.5 is chance.
    """
    if not known or not unknown:
        raise ValueError("AUROC needs at least one known and one unknown score.")
    ranked = sorted([(float(v), 0) for v in known] + [(float(v), 1) for v in unknown])
    rank_sum, position = 0.0, 0
    while position < len(ranked):  # average ranks over ties
        end = position
        while end < len(ranked) and ranked[end][0] == ranked[position][0]:
            end += 1
        average = (position + 1 + end) / 2
        rank_sum += average * sum(label for _, label in ranked[position:end])
        position = end
    n_unknown = len(unknown)
    return (rank_sum - n_unknown * (n_unknown + 1) / 2) / (n_unknown * len(known))


def open_set_check(known: Sequence[float], unknown: Sequence[float], keep: float = 0.99) -> dict[str, float]:
    """How well the locator's novelty score flags records of a task it never learnt, on your data.

    ``auroc``: threshold-free (see `auroc`). ``suggested_fence``: the smallest fence (a value for
    ``locator_open_set_fence``, at least 0) that keeps at least `keep` of the learnt tasks' records inside;
    it is chosen from the learnt records alone. ``flagged_at_suggested_fence``: the share of the
    unknown records beyond it.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep!r}: must be in (0, 1].")
    area = auroc(known, unknown)  # also refuses an empty side
    ordered = sorted(float(v) for v in known)
    fence = max(0.0, ordered[max(0, math.ceil(keep * len(ordered)) - 1)])
    return {
        "auroc": area,
        "suggested_fence": fence,
        "flagged_at_suggested_fence": sum(float(v) > fence for v in unknown) / len(unknown),
    }
