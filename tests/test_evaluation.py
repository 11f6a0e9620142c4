"""VQA-style answer normalisation and matching."""

from __future__ import annotations

import pytest

from cmoe_adapters import evaluation
from cmoe_adapters.evaluation import exact_match, normalize_answer


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Yes", "yes"),
        ("  The Circle. ", "circle"),
        ("a red triangle!", "red triangle"),
        ("Two", "2"),
        ("an  apple,  please", "apple please"),
        ("there are none", "there are 0"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_accepts_any_of_several_answers():
    assert exact_match("The circle", "circle")
    assert exact_match("two", ["2", "3"])
    assert not exact_match("circles", "circle")
    assert not exact_match("", "circle")


def test_generated_answers_are_scored_by_the_task_s_benchmark_metric(monkeypatch):
    """The default evaluator's score is the metric's rule: TextVQA's soft accuracy is not exact match."""
    records = [
        {"question": "how many?", "answer": "2", "answers": ["2"] * 2 + ["3"] * 8},  # 2 of 10 say "2"
        {"question": "brand?", "answer": "Nike", "answers": ["nike"] * 10},
    ]
    monkeypatch.setattr(evaluation, "generate_answers", lambda *args, **kwargs: ["two", "NIKE"])
    scored = {
        metric: evaluation.generated_score(None, records, None, None, metric)
        for metric in ("exact_match", "vqa", "case_insensitive")
    }
    assert scored["exact_match"] == 1.0  # "two" normalises to "2"; case is ignored
    assert scored["vqa"] == pytest.approx((0.6 + 1.0) / 2)  # min(#matches / 3, 1) over leave-one-out
    assert scored["case_insensitive"] == 0.5  # CoIN's VQAv2 rule: "two" is not "2"
    with pytest.raises(ValueError, match="vqa"):
        evaluation.generated_score(None, records, None, None, "vqa_soft")
