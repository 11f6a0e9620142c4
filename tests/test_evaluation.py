"""VQA-style answer normalisation and matching."""

from __future__ import annotations

import pytest

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
