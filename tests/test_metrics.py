"""Metrics against hand-computed matrices, and how `ContinualResult` reports the locator."""

from __future__ import annotations

import json

import pytest

from cmoe_adapters import ContinualResult
from cmoe_adapters.metrics import (
    auroc,
    backward_transfer,
    confusion_matrix,
    final_average,
    forgetting,
    locator_accuracy,
    mean_average_accuracy,
    open_set_check,
    open_set_rate,
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
    assert counts == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0]]  # last column: located in none
    assert locator_accuracy(counts) == pytest.approx(4 / 6)
    assert locator_accuracy([[0, 0], [0, 0]]) is None
    with pytest.raises(KeyError, match="'d'"):
        confusion_matrix(["d"], ["a"], tasks)
    with pytest.raises(ValueError, match="2 true tasks but 1"):
        confusion_matrix(["a", "b"], ["a"], tasks)


def test_samples_located_in_no_task_fill_the_last_column():
    tasks = ["a", "b"]
    counts = confusion_matrix(["a", "a", "a", "b", "b"], ["a", None, None, "b", "a"], tasks)
    assert counts == [[1, 0, 2], [1, 1, 0]]
    assert locator_accuracy(counts) == pytest.approx(2 / 5)  # a sample located in none is a miss
    assert open_set_rate(counts) == pytest.approx(2 / 5)
    assert open_set_rate([[3, 1], [0, 4]]) is None, "a square matrix was saved before the open set"
    assert open_set_rate([[0, 0, 0], [0, 0, 0]]) is None
    with pytest.raises(ValueError, match="cannot be None"):
        confusion_matrix([None], ["a"], tasks)


def test_auroc_of_a_novelty_score():
    assert auroc([0.1, 0.2], [0.8, 0.9]) == 1.0
    assert auroc([0.8, 0.9], [0.1, 0.2]) == 0.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5  # ties count half
    assert auroc([0.1, 0.6], [0.5, 0.9]) == pytest.approx(3 / 4)


# -- ContinualResult: the locator in results.json and results.md ----------------------------------

OPEN_SET = ContinualResult(
    tasks=["color", "shape", "count"],
    accuracy_matrix=[[0.9], [0.85, 0.8], [0.8, 0.75, 0.7]],
    locator_confusion=[[18, 1, 0, 1], [0, 20, 0, 0], [2, 0, 15, 3]],
)


def test_the_result_reports_the_open_set_rate_and_each_task_s_locator_accuracy():
    assert OPEN_SET.locator_accuracy == pytest.approx(53 / 60)
    assert OPEN_SET.open_set_rate == pytest.approx(4 / 60)
    assert OPEN_SET.summary()["open_set_rate"] == pytest.approx(4 / 60)
    assert OPEN_SET.locator_accuracy_per_task == pytest.approx({"color": 0.9, "shape": 1.0, "count": 0.75})
    saved = json.loads(json.dumps(OPEN_SET.to_dict()))
    assert saved["locator_accuracy_per_task"] == pytest.approx({"color": 0.9, "shape": 1.0, "count": 0.75})
    loaded = ContinualResult.from_dict(saved)
    assert loaded.locator_confusion == OPEN_SET.locator_confusion
    assert loaded.open_set_rate == OPEN_SET.open_set_rate
    no_locator = ContinualResult(tasks=["a"], accuracy_matrix=[[0.5]])  # a plain LoRA baseline
    assert no_locator.open_set_rate is None and no_locator.locator_markdown() == ""
    assert "Task locator" not in no_locator.markdown()


def test_results_md_has_a_per_task_locator_table_with_the_none_column():
    markdown = OPEN_SET.markdown()
    assert "| after \\ on | color | shape | count |" in markdown
    assert "| open_set_rate | 6.7 |" in markdown and "| locator_accuracy | 88.3 |" in markdown
    table = markdown[markdown.index("| task \\ located to") :].splitlines()
    assert table[0] == (
        "| task \\ located to | color | shape | count | none (base model) | locator accuracy | samples |"
    )
    assert table[2] == "| color | 90.0 | 5.0 | 0.0 | 5.0 | 90.0 | 20 |"
    assert table[3] == "| shape | 0.0 | 100.0 | 0.0 | 0.0 | 100.0 | 20 |"
    assert table[4] == "| count | 10.0 | 0.0 | 75.0 | 15.0 | 75.0 | 20 |"
    assert table[5] == "| all | 33.3 | 35.0 | 25.0 | 6.7 | 88.3 | 60 |", "none of all = the open-set rate"
    assert "answered by the base model" in markdown


def test_a_task_without_eval_samples_has_an_empty_locator_row():
    result = ContinualResult(
        tasks=["a", "b"], accuracy_matrix=[[1.0], [1.0, None]], locator_confusion=[[4, 0, 0], [0, 0, 0]]
    )
    assert result.locator_accuracy_per_task == {"a": 1.0, "b": None}
    assert "| b | - | - | - | - | 0 |" in result.markdown()


def test_an_old_results_json_with_a_square_confusion_still_loads_and_summarises(tmp_path):
    old = {  # results.json as written before the open set: no none column, no open_set_rate
        "tasks": ["a", "b"],
        "accuracy_matrix": [[1.0], [0.5, 1.0]],
        "oracle_accuracy_matrix": None,
        "locator_confusion": [[3, 1], [0, 4]],
        "task_logs": [],
        "summary": {"final_average": 0.75, "locator_accuracy": 0.875},
    }
    (tmp_path / "results.json").write_text(json.dumps(old))
    result = ContinualResult.load(str(tmp_path))
    assert result.locator_accuracy == pytest.approx(7 / 8)
    assert result.open_set_rate is None and result.summary()["open_set_rate"] is None
    assert result.locator_accuracy_per_task == {"a": 0.75, "b": 1.0}
    markdown = result.markdown()
    assert "open_set_rate" not in markdown, "an unknown rate is left out of the summary table"
    assert "| a | 75.0 | 25.0 | - | 75.0 | 4 |" in markdown and "saved before the open set" in markdown
    result.save(str(tmp_path))  # and it saves again
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["open_set_rate"] is None


def test_results_name_each_task_s_metric_and_the_papers_columns(tmp_path):
    result = ContinualResult(
        ["TextVQA", "ScienceQA"], [[0.5], [0.4, 0.8]], task_metrics=["vqa", "option_letter"]
    )
    markdown = result.markdown()
    assert "| *metric* | `vqa` | `option_letter` |" in markdown
    assert "| Last (final_average) | 60.0 |" in markdown  # the final row's average
    assert "| Avg (mean_average_accuracy) | 55.0 |" in markdown and "| BWT (bwt) | -10.0 |" in markdown
    result.save(str(tmp_path))
    assert ContinualResult.load(str(tmp_path)).task_metrics == ["vqa", "option_letter"]


def test_open_set_check_picks_its_fence_from_the_learnt_records_alone():
    known = [float(v) for v in range(-50, 50)]  # 100 learnt records' novelty
    check = open_set_check(known, [48.5, 60.0, -3.0, 100.0])
    assert check["suggested_fence"] == 48.0  # the 99th of 100, so one learnt record lies beyond
    assert check["flagged_at_suggested_fence"] == 0.75
    assert check["auroc"] == pytest.approx(auroc(known, [48.5, 60.0, -3.0, 100.0]))
    assert open_set_check([-5.0, -2.0], [1.0])["suggested_fence"] == 0.0  # a fence is never negative
    assert open_set_check(known, [0.0], keep=1.0)["suggested_fence"] == 49.0
    with pytest.raises(ValueError, match="keep=0"):
        open_set_check(known, [0.0], keep=0)
