"""Metrics against hand-computed matrices."""

from __future__ import annotations

import pytest

from cmoe_adapters.metrics import (
    backward_transfer,
    confusion_matrix,
    final_average,
    forgetting,
    locator_accuracy,
    mean_average_accuracy,
)

# after task 0: 0.9 | after task 1: 0.6, 0.8 | after task 2: 0.3, 0.7, 0.5
ACC = [[0.9], [0.6, 0.8], [0.3, 0.7, 0.5]]


def test_final_average():
    assert final_average(ACC) == pytest.approx((0.3 + 0.7 + 0.5) / 3)


def test_mean_average_accuracy():
    assert mean_average_accuracy(ACC) == pytest.approx((0.9 + 0.7 + 0.5) / 3)


def test_backward_transfer():
    assert backward_transfer(ACC) == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)
    assert backward_transfer([[0.5]]) == 0.0
    assert backward_transfer([[0.5], [0.7, 0.1]]) == pytest.approx(0.2)  # positive transfer


def test_forgetting_uses_the_best_earlier_score():
    # task 0: best before the end 0.9, final 0.3 -> 0.6; task 1: best 0.8, final 0.7 -> 0.1
    assert forgetting(ACC) == pytest.approx((0.6 + 0.1) / 2)
    assert forgetting([[0.4], [0.8, 0.5], [0.6, 0.5, 0.9]]) == pytest.approx(((0.8 - 0.6) + 0.0) / 2)


def test_missing_entries_are_left_out_not_counted_as_zero():
    acc = [[0.9], [None, 0.8], [0.3, 0.7, None]]
    assert final_average(acc) == pytest.approx(0.5)
    assert mean_average_accuracy(acc) == pytest.approx((0.9 + 0.8 + 0.5) / 3)
    assert backward_transfer(acc) == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="empty"):
        final_average([])
    with pytest.raises(ValueError, match="Row 1"):
        backward_transfer([[0.5], [0.5]])


def test_confusion_matrix_and_locator_accuracy():
    tasks = ["a", "b", "c"]
    counts = confusion_matrix(["a", "a", "b", "c", "c", "c"], ["a", "b", "b", "c", "a", "c"], tasks)
    assert counts == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert locator_accuracy(counts) == pytest.approx(4 / 6)
    assert locator_accuracy([[0, 0], [0, 0]]) is None
    with pytest.raises(KeyError, match="'d'"):
        confusion_matrix(["d"], ["a"], tasks)
    with pytest.raises(ValueError, match="2 true tasks but 1"):
        confusion_matrix(["a", "b"], ["a"], tasks)
