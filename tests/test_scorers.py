"""The benchmarks' official scorers, on hand-worked cases taken from the rules of their scripts."""

from __future__ import annotations

import sys
import types

import pytest
from PIL import Image

from cmoe_adapters.data import DataError
from cmoe_adapters.scorers import (
    BENCHMARK_METRICS,
    SCORERS,
    benchmark_metric,
    box_iou,
    caption_tokens,
    coin_box,
    corpus_bleu,
    corpus_cider,
    get_scorer,
    parse_box,
    parse_option_letter,
    rouge_l,
    score_predictions,
    vqa_normalize,
    vqa_soft_accuracy,
)


def score(metric, prediction, **record):
    return SCORERS[metric](prediction, record)


# ---------------------------------------------------------------------------------- VQA (m4c)


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [
        ("Two dogs.", "2 dogs"),  # number words -> digits, the final period goes
        ("none", "0"),  # m4c's number map starts with "none"
        ("The cat", "cat"),  # articles go
        ("an apple", "apple"),
        ("3,000", "3000"),  # commas go first
        ("1.5", "1.5"),  # a period before a digit stays
        ("yes!", "yes"),  # a mark at the end becomes a space, then vanishes with the split
        ("hello-world", "hello world"),  # a mark inside a word becomes a space...
        ("a - b", "b"),  # ... and one touching a space is deleted ("a" is an article)
        ("dont", "don't"),  # contractions get their apostrophe back
        ("isnt it", "isn't it"),
        ("man's hat", "man 's hat"),  # 's is split off
        ("  Red\n", "red"),
        ("what?", "what"),
    ],
)
def test_vqa_normalisation_of_numbers_articles_punctuation_and_contractions(answer, normalised):
    assert vqa_normalize(answer) == normalised


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_is_min_matches_over_3_averaged_over_the_ten_leave_one_out_subsets(matches, expected):
    # k matches: the k subsets leaving a match out see k-1, the 10-k others see k
    answers = ["two"] * matches + ["blue"] * (10 - matches)
    assert vqa_soft_accuracy("2", answers) == pytest.approx(expected)
    assert score("vqa", " 2 ", answers=answers) == pytest.approx(expected)


def test_vqa_reads_annotation_dicts_and_needs_the_ten_answers():
    answers = [{"answer": "Yes"}] * 2 + [{"answer": "no"}] * 8
    assert score("vqa", "yes", answers=answers) == pytest.approx(0.6)
    with pytest.raises(DataError, match=r"question_id=7: the 'vqa' accuracy needs the 10 human answers"):
        score("vqa", "yes", question_id=7, answer="yes")


# -------------------------------------------------------------------------------- grounding IoU


def test_box_iou():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union


def test_the_box_is_read_as_coins_script_reads_it():
    # brackets removed, then the first and last characters dropped: the last coordinate loses a digit
    assert coin_box("[0.12, 0.34, 0.56, 0.78]") == pytest.approx([0.12, 0.34, 0.56, 0.7])
    assert coin_box("[0.1, 0.2, 0.3]") is None  # three numbers
    assert coin_box("a dog on the left") is None
    assert coin_box("The box is [0.1, 0.2, 0.3, 0.4].") is None  # text around the box: unreadable
    assert parse_box("The box is [0.1, 0.2, 0.3, 0.4].") == [0.1, 0.2, 0.3, 0.4]


def test_grounding_counts_iou_above_one_half_and_unreadable_answers_as_wrong():
    reference = {"answer_bbox": "[0.1, 0.2, 0.5, 0.6]"}
    assert score("grounding_iou", "[0.1, 0.2, 0.5, 0.65]", **reference) == 1.0  # read as ...0.6: IoU 1
    assert score("grounding_iou", "[0.0, 0.0, 1.0, 1.0]", answer_bbox="[0, 0, 1, 0.51]") == 1.0  # IoU 0.51
    assert score("grounding_iou", "[0.0, 0.0, 1.0, 1.0]", answer_bbox="[0, 0, 1, 0.5]") == 0.0  # IoU 0.5
    assert score("grounding_iou", "[0.7, 0.7, 0.9, 0.9]", **reference) == 0.0  # no overlap
    assert score("grounding_iou", "the dog on the left", **reference) == 0.0
    assert score("grounding_iou", "[0.1, 0.2, 0.5]", **reference) == 0.0
    # where the script's reading matters: y2 = 0.09 is read as 0.0, an empty box
    assert score("grounding_iou", "[0.0, 0.0, 0.5, 0.09]", answer_bbox=[0.0, 0.0, 0.5, 0.09]) == 0.0
    assert score("box_iou", "[0.0, 0.0, 0.5, 0.09]", answer_bbox=[0.0, 0.0, 0.5, 0.09]) == 1.0
    assert score("box_iou", "It is at [0.1, 0.2, 0.5, 0.6].", **reference) == 1.0
    with pytest.raises(DataError, match=r"record id='g1': needs 'answer_bbox'"):
        score("grounding_iou", "[0.1, 0.2, 0.5, 0.6]", id="g1", answer="left dog")


# ------------------------------------------------------------------------------- option letters


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),  # exactly a letter
        ("B. a cat", "B"),  # "B. ..."
        ("The answer is C", "C"),  # the first one-character word
        ("b", "B"),  # ... upper-cased
        ("a cat", "A"),  # even an article
        ("it's B", "S"),  # "it's" ends in a one-character word
        ("cat", "FAILED"),
        ("F", "F"),  # read, but no option
    ],
)
def test_option_letter_parsing(prediction, letter):
    assert parse_option_letter(prediction) == letter


def test_option_letter_compares_indices_within_the_choices():
    choices = ["a cat", "a dog", "a cow"]
    assert score("option_letter", "B", answer=1, choices=choices) == 1.0
    assert score("option_letter", "B. a dog", answer="B", choices=choices) == 1.0
    assert score("option_letter", "The answer is B.", answer="B. a dog") == 1.0
    assert score("option_letter", "a dog", answer=1, choices=choices) == 0.0  # reads "A"
    assert score("option_letter", "a dog", answer=0, choices=choices) == 1.0
    assert score("option_letter", "D", answer=3) == 1.0  # without choices every letter A-E is valid
    assert score("option_letter", "D", answer=3, choices=choices) == 0.0  # D is no option of three
    assert score("option_letter", "cat", answer=0, choices=choices) == 0.0
    with pytest.raises(DataError, match="needs the answer's index or letter"):
        score("option_letter", "B", answer="a dog")


# ------------------------------------------------------------------------ string-matching rules


def test_case_insensitive_compares_exactly_but_for_case():
    assert score("case_insensitive", "Yes", answer="yes") == 1.0
    assert score("case_insensitive", "yes.", answer="yes") == 0.0  # nothing else is normalised
    assert score("case_insensitive", "two", answer="2") == 0.0
    assert score("case_insensitive", "NO", answer=["yes", "no"]) == 1.0


def test_gqa_strips_trailing_periods_and_lowers_the_prediction_only():
    assert score("gqa", "Yes.", answer="yes") == 1.0
    assert score("gqa", "yes", answer="Yes") == 0.0


def test_imagenet_either_contains():
    assert score("either_contains", "golden retriever dog", answer="golden retriever") == 1.0
    assert score("either_contains", "retriever", answer="golden retriever") == 1.0
    assert score("either_contains", "Golden Retriever", answer="golden retriever") == 0.0  # case-sensitive
    assert score("either_contains", "  ", answer="golden retriever") == 0.0  # deviation: "" is wrong


def test_ocrvqa():
    assert score("ocrvqa", "JOHN SMITH", answer="John Smith") == 1.0
    assert score("ocrvqa", "Unanswerable", answer="Unanswerable") == 0.0


def test_exact_match_is_the_librarys_normalised_match():
    assert score("exact_match", "The Red.", answer="red") == 1.0
    assert score("exact_match", "two", answer=["2", "3"]) == 1.0
    assert score("exact_match", "blue", answer="red") == 0.0


# --------------------------------------------------------------------------- MLLM-CL domain rules


def test_ai2d_match_words_and_phrases():
    assert score("ai2d_match", "It is a forest.", answer="Forest") == 1.0  # a word of the prediction
    assert score("ai2d_match", "forestry", answer="forest") == 1.0  # one-word prediction: substring
    assert score("ai2d_match", "it is a forest", answer="for") == 1.0  # sic: " for" is in " forest"
    assert score("ai2d_match", "a dense forest here", answer="dense forest") == 1.0
    assert score("ai2d_match", "a forest", answer="dense forest") == 0.0
    assert score("ai2d_match", "Unanswerable", answer="unanswerable") == 0.0


def test_pvqa_finvis_cvbench_and_mmt_rules():
    assert score("pvqa_contains", "yes, it is", answer="Yes") == 1.0
    assert score("finvis_match", "True.", answer="true") == 1.0
    assert score("finvis_match", "A B", answer="a") == 0.0  # "ab"
    assert score("cvbench_contains", "(a) left.", answer="(A)") == 1.0
    assert score("cvbench_contains", "(b)", answer="(A)") == 0.0
    assert score("mmt_option", " b ", answer="B") == 1.0
    assert score("mmt_option", "B. the button", answer="B") == 0.0


def test_sci_match_by_source_data_set():
    assert score("sci_match", "B", image="Sci/images/AI2D_12.png", answer="b") == 1.0
    assert score("sci_match", "B.", image="Sci/images/TQA_3.png", answer="b") == 0.0  # exact there
    mapqa = {"image": "Sci/images/mapqa_5.png", "question": "Which states have a value above 5?"}
    assert score("sci_match", "Alabama, Ohio", answer="alabama, texas", **mapqa) == 0.5  # partial credit
    assert score("sci_match", "the answer is ohio", image="Sci/images/mapqa_6.png", answer="Ohio") == 1.0
    with pytest.raises(DataError, match="give the image as a path"):
        score("sci_match", "B", image=Image.new("RGB", (2, 2)), answer="b")


# -------------------------------------------------------------------------- MLLM-CL ability rules


def test_ocrbench_substring_and_handwritten_formulas():
    assert (
        score("ocrbench", "Hello there", answer=["hello", "world"], answer_type="Scene Text-centric VQA")
        == 1.0
    )
    hmer = "Handwritten Mathematical Expression Recognition"
    assert score("ocrbench", "x ^ { 2 }", answer="x^{2}", answer_type=hmer) == 1.0  # spaces removed
    assert score("ocrbench", "x", answer="X", answer_type=hmer) == 0.0  # case kept


def test_mathvista_rule_based_extraction():
    mc = {"question_type": "multi_choice", "choices": "['3/11', '8/11', '6/11', '3/5']", "answer_option": "B"}
    assert score("mathvista", "The correct answer is (B) 8/11.", answer="8/11", **mc) == 1.0
    assert score("mathvista", "8/11", answer="8/11", **mc) == 1.0  # the one option text it contains
    assert score("mathvista", "A or B", answer="8/11", **mc) == 0.0  # two letters: left to the judge
    assert score("mathvista", "C", answer="8/11", **mc) == 0.0
    assert score("mathvista", "14", question_type="free_form", answer_type="integer", answer="14") == 1.0
    # the script would ask GPT-4o-mini to extract "14" from this; offline it counts as wrong
    assert (
        score("mathvista", "It is 14", question_type="free_form", answer_type="integer", answer="14") == 0.0
    )
    assert score("mathvista", "0.6", question_type="free_form", answer_type="float", answer="0.6") == 1.0
    with pytest.raises(DataError, match="needs the record's 'question_type'"):
        score("mathvista", "14", answer="14")


# ------------------------------------------------------------------------------------- captions


def test_caption_tokens_follow_coco_captions_ptb_tokenizer():
    def tokens(text):
        return " ".join(caption_tokens(text))

    assert tokens("A man's riding a bike, isn't he?") == "a man 's riding a bike is n't he"
    assert tokens('Two dogs (brown) play "outside".') == "two dogs -lrb- brown -rrb- play outside"
    assert tokens("A black-and-white photo, 1,000 people") == "a black-and-white photo 1,000 people"


def test_bleu_on_a_worked_example():
    # hypothesis "the cat the cat", reference "the cat is here": unigrams 2/4 clipped, bigrams 1/3
    bleu = corpus_bleu([["the", "cat", "the", "cat"]], [[["the", "cat", "is", "here"]]])
    assert bleu[0] == pytest.approx(0.5)
    assert bleu[1] == pytest.approx((0.5 * 1 / 3) ** 0.5)
    # a hypothesis shorter than its closest reference pays the brevity penalty exp(1 - 4/2)
    assert corpus_bleu([["the", "cat"]], [[["the", "cat", "is", "here"]]])[0] == pytest.approx(
        2.718281828**-1
    )


def test_rouge_l_on_a_worked_example():
    # LCS("a b c d", "a c d e f") = 3: precision 3/4, recall 3/5, F with beta 1.2
    expected = (1 + 1.44) * 0.75 * 0.6 / (0.6 + 1.44 * 0.75)
    assert rouge_l(list("abcd"), [list("acdef"), list("xyz")]) == pytest.approx(expected)


def test_cider_on_a_worked_example():
    # each caption equals its one reference and shares no n-gram with the other image's: cosine 1 for
    # unigrams and bigrams, nothing for 3- and 4-grams, so (1 + 1 + 0 + 0) / 4 x 10 = 5
    assert corpus_cider([["a", "b"], ["c", "d"]], [[["a", "b"]], [["c", "d"]]]) == pytest.approx(5.0)


# values pycocoevalcap 1.2 computes on these captions (whitespace-tokenised)
_CAPTIONS = [
    ("a man rides a bike", ["a man riding a red bike", "a person on a bicycle"]),
    ("two dogs in the snow", ["two dogs play in the snow", "dogs running in snow"]),
    ("a dog on a sofa", ["a cat sleeping on a sofa"]),
]


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("bleu_1", 0.8666666665511112),
        ("bleu_2", 0.658280588511127),
        ("bleu_3", 0.4583562889542627),
        ("bleu_4", 6.329429739287615e-05),
        ("rouge_l", 0.775171065493646),
        ("cider", 2.407385537390475),
    ],
)
def test_caption_metrics_match_pycocoevalcap(metric, expected):
    predictions = [prediction for prediction, _ in _CAPTIONS]
    records = [{"captions": captions} for _, captions in _CAPTIONS]
    assert score_predictions(metric, predictions, records) == pytest.approx(expected, rel=1e-9)


def test_corpus_metrics_are_not_scored_one_record_at_a_time():
    with pytest.raises(ValueError, match="'cider' is a corpus-level metric"):
        SCORERS["cider"]("a dog", {"answer": "a dog"})


def test_the_official_caption_average_needs_pycocoevalcap(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ImportError, match="needs `pip install pycocoevalcap` and a Java runtime"):
        score_predictions("caption", ["a dog"], [{"answer": "a dog"}])


def test_the_official_caption_average_is_the_mean_of_seven_pycocoevalcap_numbers(monkeypatch):
    seen = {}

    def metric(value):
        class Metric:
            def __init__(self, *args):
                pass

            def compute_score(self, gts, res):
                seen["gts"], seen["res"] = gts, res
                return value, None

        return Metric

    class PTBTokenizer:
        def tokenize(self, captions):
            return {key: [c["caption"].lower() for c in value] for key, value in captions.items()}

    modules = {
        "pycocoevalcap": types.ModuleType("pycocoevalcap"),
        "pycocoevalcap.bleu.bleu": types.SimpleNamespace(Bleu=metric([0.1, 0.2, 0.3, 0.4])),
        "pycocoevalcap.meteor.meteor": types.SimpleNamespace(Meteor=metric(0.5)),
        "pycocoevalcap.rouge.rouge": types.SimpleNamespace(Rouge=metric(0.6)),
        "pycocoevalcap.cider.cider": types.SimpleNamespace(Cider=metric(1.4)),
        "pycocoevalcap.tokenizer.ptbtokenizer": types.SimpleNamespace(PTBTokenizer=PTBTokenizer),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    value = score_predictions("caption", ["A dog"], [{"captions": ["A dog runs", "a dog"]}])
    assert value == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.6 + 1.4) / 7)
    assert seen == {"gts": {0: ["a dog runs", "a dog"]}, "res": {0: ["a dog"]}}


# --------------------------------------------------------------------------- registry and tables


def test_score_predictions_averages_per_record_scores():
    records = [{"answers": ["red"] * 10}, {"answers": ["red"] * 2 + ["blue"] * 8}]
    assert score_predictions("vqa", ["Red", "red"], records) == pytest.approx((1.0 + 0.6) / 2)
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        score_predictions("vqa", ["red", "red"], records[:1])
    with pytest.raises(ValueError, match="empty data set"):
        score_predictions("vqa", [], [])


def test_an_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown metric 'bleu'; known metrics: exact_match, vqa, .*cider"):
        get_scorer("bleu")
    with pytest.raises(ValueError, match="Unknown metric 'rouge'"):
        score_predictions("rouge", ["a"], [{"answer": "a"}])


def test_every_task_of_every_benchmark_has_a_registered_metric():
    assert list(BENCHMARK_METRICS["CoIN"]) == [
        "ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA"
    ]  # fmt: skip
    assert list(BENCHMARK_METRICS["UCIT"]) == [
        "ImageNet-R",
        "ArxivQA",
        "VizWiz",
        "IconQA",
        "CLEVR-Math",
        "Flickr30k",
    ]
    assert list(BENCHMARK_METRICS["MLLM-DCL"]) == ["RS", "Med", "AD", "Sci", "Fin"]
    assert list(BENCHMARK_METRICS["MLLM-ACL"]) == ["OCR", "Math", "VP", "APP"]
    for tasks in BENCHMARK_METRICS.values():
        assert set(tasks.values()) <= set(SCORERS)
    assert benchmark_metric("coin", "refcoco") == "grounding_iou"
    assert benchmark_metric("CoIN", "VizWiz") == "case_insensitive"
    assert benchmark_metric("UCIT", "vizwiz") == "caption"  # VizWiz-Caption there
    with pytest.raises(ValueError, match="CoIN has no task 'Flickr30k'; its tasks: ScienceQA, TextVQA"):
        benchmark_metric("CoIN", "Flickr30k")
    with pytest.raises(ValueError, match="Unknown benchmark 'VQA'; known benchmarks: CoIN, UCIT"):
        benchmark_metric("VQA", "x")


def test_every_scorer_names_the_source_of_its_rule():
    for name, scorer in SCORERS.items():
        assert scorer.name == name and scorer.rule and "/" in scorer.source
        assert "Source" in scorer.doc, name
