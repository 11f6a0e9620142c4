"""Scorers: each benchmark task's official rule for one generated answer, by name.

A number is comparable with a paper's table only when it is scored by the rule of the benchmark's
own evaluation script, and those rules differ per task (soft VQA accuracy, a box's IoU, an option
letter parsed from text, case-insensitive equality, substring tests...). Each `Scorer` here is one
such rule, reimplemented from the script named in its ``source`` (repository + path); where the
script and its paper disagree, the script is followed and the docstring says how.

* ``SCORERS[name](prediction, record)`` scores one generated answer against one record's
  reference(s), a float in [0, 1];
* ``score_predictions(name, predictions, records)`` scores a data set (the mean of the per-record
  scores, or the corpus-level value for captioning metrics such as CIDEr);
* ``BENCHMARK_METRICS[benchmark][task]`` is the metric each task of CoIN, UCIT and MLLM-CL is
  scored with, and `benchmark_metric` looks it up.

Every benchmark's generation script strips the decoded answer before scoring it (e.g. CoIN's
``ETrain/Eval/LLaVA/CoIN/model_vqa.py``: ``outputs.strip()``), so every scorer strips the
prediction first. Records are the library's format (`data.py`): ``answer`` (or the last
assistant turn), plus the fields a rule needs (``answers``, ``answer_bbox``, ``choices``...),
named in each scorer's docstring; a record without them raises `DataError` naming it.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .data import DataError, record_name, reference_answer

Record = Mapping[str, Any]

_COIN = "zackschen/CoIN"
_MCITLIB = "Ghy0501/MCITlib"
_MLLMCL = "bjzhb666/MLLM-CL"


@dataclass(frozen=True)
class Scorer:
    """One metric: a per-record rule (``sample``) or a corpus-level one (``corpus``), and its source.

    Calling a scorer scores one prediction against one record; `score_all` scores a data set
    (the mean of the per-record scores unless the metric is corpus-level, like CIDEr, whose
    document frequencies come from the whole reference set).
    """

    name: str
    rule: str
    source: str
    sample: Callable[[str, Record], float] | None = None
    corpus: Callable[[list[str], list[Record]], float] | None = None
    # what this machine lacks to run the rule, in words (None: nothing), and the pure-Python metric
    # an offline check (`--tiny`) scores with instead
    lacking: Callable[[], str | None] | None = None
    stand_in: str | None = None

    def missing(self) -> str | None:
        """What this machine lacks to score this metric (a package, a program), or None."""
        return self.lacking() if self.lacking is not None else None

    @property
    def doc(self) -> str:
        """The rule's docstring: exactly what is compared, its source, where it differs from papers."""
        function = self.sample or self.corpus
        return (function.__doc__ or "").strip() if function is not None else ""

    def __call__(self, prediction: str, record: Record) -> float:
        if self.sample is None:
            raise ValueError(
                f"{self.name!r} is a corpus-level metric (it needs every prediction of the data set); "
                "score it with score_predictions()."
            )
        return float(self.sample(str(prediction).strip(), record))

    def score_all(self, predictions: Sequence[str], records: Sequence[Record]) -> float:
        """The metric over a data set, `predictions[i]` answering `records[i]`."""
        predictions = [str(p).strip() for p in predictions]
        records = list(records)
        if len(predictions) != len(records):
            raise ValueError(f"{len(predictions)} predictions for {len(records)} records.")
        if not records:
            raise ValueError("Cannot score an empty data set.")
        if self.corpus is not None:
            return float(self.corpus(predictions, records))
        assert self.sample is not None
        return sum(float(self.sample(p, r)) for p, r in zip(predictions, records, strict=True)) / len(records)


# ------------------------------------------------------------------------ references of a record


def _answer(record: Record) -> Any:
    try:
        return reference_answer(record)
    except DataError as error:
        raise DataError(f"{record_name(record)}: {error}") from None


def _answer_list(record: Record) -> list[str]:
    """The accepted answer(s): a list ``answer`` as it is, a single one as a list of one."""
    answer = _answer(record)
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


def _question(record: Record) -> str:
    """The question text as the benchmark's test file has it (``question``, ``text`` or first turn)."""
    for key in ("question", "text"):
        if isinstance(record.get(key), str):
            return record[key]
    turns = record.get("conversations") or ()
    return str(turns[0].get("value", "")) if turns else ""


def _field(record: Record, key: str, metric: str) -> Any:
    if key not in record:
        raise DataError(f"{record_name(record)}: the {metric!r} metric needs the record's {key!r}.")
    return record[key]


# ------------------------------------------------------------------- normalised exact match (ours)


def _exact_match(prediction: str, record: Record) -> float:
    """This library's default: `evaluation.exact_match` against ``answer`` (a list: any of them).

    Source: cmoe_adapters/evaluation.py::exact_match. No benchmark scores with it; it stays the
    default for the library's own record format (easy-vqa, user data).
    """
    # imported here: evaluation picks a task's scorer from this module, so it cannot be imported first
    from .evaluation import exact_match

    return float(exact_match(prediction, _answer_list(record)))


# --------------------------------------------------------------------------- VQA (m4c) accuracy

_CONTRACTION_TABLE = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""  # the official VQA evaluation's table, as m4c has it (keys with capitals never match: text is lowered)
_CONTRACTIONS = dict(pair.split("=") for pair in _CONTRACTION_TABLE.split())
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so any "." not before a digit
_VQA_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_normalize(answer: str) -> str:
    """An answer as the m4c / EvalAI answer processor normalises it before comparing.

    Lower-case; drop ``,`` and ``?``; split ``'s`` off; each other punctuation mark is deleted when
    it touches a space (or the text has a digit comma) and becomes a space otherwise; periods not
    followed by a digit go (only the first 32: m4c passes ``re.UNICODE`` as ``sub``'s count); number
    words become digits, articles go, and contractions get their apostrophes back.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for mark in _VQA_PUNCTUATION:
        touches = mark + " " in spaced or " " + mark in spaced or _VQA_COMMA.search(spaced) is not None
        text = text.replace(mark, "" if touches else " ")
    text = _VQA_PERIOD.sub("", text, count=int(re.UNICODE))  # sic, see the docstring
    words = [_VQA_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#matching human answers / 3, 1), averaged over the leave-one-out subsets of `answers`.

    With k of the 10 answers matching: k = 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.
    """
    predicted = vqa_normalize(prediction)
    normalised = [vqa_normalize(a) for a in answers]
    matches = sum(a == predicted for a in normalised)
    return sum(min(1.0, (matches - (a == predicted)) / 3) for a in normalised) / len(normalised)


def _vqa(prediction: str, record: Record) -> float:
    """TextVQA in CoIN: the m4c soft accuracy over the record's 10 human ``answers``.

    Source: zackschen/CoIN ETrain/Eval/LLaVA/CoIN/m4c_evaluator.py (``TextVQAAccuracyEvaluator``,
    ``EvalAIAnswerProcessor``, copied there from facebookresearch/mmf), run by
    ETrain/Eval/LLaVA/CoIN/eval_textvqa.py against TextVQA_0.5.1_val.json's ``answers``. It differs
    from the VQA v2 server's vqaEval.py in one way: m4c always normalises punctuation and numbers,
    vqaEval.py only when the 10 answers disagree. ``answers`` may also be VQA annotation dicts
    (``{"answer": ...}``); a list ``answer`` of 10 is read the same way.
    """
    answers = record.get("answers")
    if answers is None:
        answers = _answer(record)
    if not isinstance(answers, (list, tuple)) or len(answers) != 10:
        count = len(answers) if isinstance(answers, (list, tuple)) else 1
        raise DataError(
            f"{record_name(record)}: the 'vqa' accuracy needs the 10 human answers ('answers', as in "
            f"TextVQA_0.5.1_val.json / VQA v2's annotations), got {count}; m4c asserts 10."
        )
    answers = [a["answer"] if isinstance(a, Mapping) else str(a) for a in answers]
    return vqa_soft_accuracy(prediction, answers)


# -------------------------------------------------------------------------- ScienceQA option letter

_OPTIONS = ("A", "B", "C", "D", "E")


def parse_option_letter(prediction: str) -> str:
    """The option letter CoIN's ScienceQA script reads, or ``"FAILED"``.

    The whole answer if it is a letter; ``"B. ..."``'s letter; else the first one-character word,
    upper-cased (so ``"a cat"`` reads as ``A`` and ``"it's B"`` as ``S``, which is no option).
    """
    if prediction in _OPTIONS:
        return prediction
    if len(prediction) >= 3 and prediction[0] in _OPTIONS and prediction[1:3] == ". ":
        return prediction[0]
    found = re.findall(r"\b(\w)\b", prediction)
    return found[0].upper() if found else "FAILED"


def _answer_index(record: Record) -> int:
    answer = _answer(record)
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    text = str(answer).strip()
    if text.isdigit():
        return int(text)
    match = re.fullmatch(r"\(?([A-E])\)?(?:[.:)]\s.*)?", text, re.DOTALL)
    if match:
        return _OPTIONS.index(match.group(1))
    raise DataError(
        f"{record_name(record)}: the 'option_letter' metric needs the answer's index or letter (A-E), "
        f"got {answer!r}."
    )


def _option_letter(prediction: str, record: Record) -> float:
    """ScienceQA in CoIN: the parsed option letter's index equals the answer's (`parse_option_letter`).

    Source: zackschen/CoIN ETrain/Eval/LLaVA/CoIN/eval_science_qa.py. The answer is the record's
    ``answer``: an index (problems.json's ``answer``) or a letter (``"B"``, ``"B. text"``); a letter
    beyond the record's ``choices`` (all of A-E without them) is wrong, as is ``"FAILED"``. MCITlib's
    copy (LoRA-FT/llava/eval/CoIN/eval_science_qa.py) keeps LLaVA's older rule instead (exactly one
    "The answer is X." match); CoIN's tables use this one.
    """
    choices = record.get("choices")
    valid = _OPTIONS[: len(choices)] if choices is not None else _OPTIONS
    letter = parse_option_letter(prediction)
    return float((valid.index(letter) if letter in valid else -1) == _answer_index(record))


# ------------------------------------------------------------------------- string-matching rules


def _case_insensitive(prediction: str, record: Record) -> float:
    """``prediction.upper() == answer.upper()``: nothing else normalised, no VQA soft accuracy.

    Sources: zackschen/CoIN ETrain/Eval/LLaVA/CoIN/eval_vqav2.py and eval_vizwiz.py (CoIN's VQAv2
    and VizWiz, against the one ``answer`` of its val.json: though both data sets have 10 human
    answers and an official soft accuracy, the script compares with one); Ghy0501/MCITlib
    LoRA-FT/llava/eval/CoIN/eval_deepseek_r1.py (UCIT's ImageNet-R, ArxivQA, IconQA, CLEVR-Math; its
    LLM-judge score is commented out there). A list ``answer`` matches any of its answers.
    """
    return float(any(prediction.upper() == answer.upper() for answer in _answer_list(record)))


def _gqa(prediction: str, record: Record) -> float:
    """GQA in CoIN: the prediction without trailing periods, lower-cased, equals the answer as it is.

    Sources: zackschen/CoIN ETrain/Eval/LLaVA/CoIN/convert_gqa_for_eval.py (``rstrip('.').lower()``)
    and ETrain/Eval/LLaVA/CoIN/eval_gqa.py (``predicted == gold``, the "Accuracy" over balanced
    questions: give the testdev-balanced records). GQA's answers are lower case; an upper-case
    reference would never match, as in the script.
    """
    return float(any(prediction.rstrip(".").lower() == answer for answer in _answer_list(record)))


def _either_contains(prediction: str, record: Record) -> float:
    """ImageNet in CoIN: the answer is in the prediction or the prediction is in the answer.

    Source: zackschen/CoIN ETrain/Eval/LLaVA/CoIN/eval_ImagetNet.py (case-sensitive, no
    normalisation). One deviation: an empty prediction is wrong here, while the script counts it
    right (``"" in answer`` is always true), which would score a model that says nothing 100%.
    """
    if not prediction:
        return 0.0  # deviation: the script counts "" (a substring of every answer) as right
    return float(any(a in prediction or prediction in a for a in _answer_list(record)))


def _ocrvqa(prediction: str, record: Record) -> float:
    """OCR-VQA in CoIN: case-insensitive equality; a prediction containing "Unanswerable" is wrong.

    Source: zackschen/CoIN ETrain/Eval/LLaVA/CoIN/eval_ocrvqa.py (such predictions are skipped but
    still counted in the total, i.e. wrong).
    """
    if "Unanswerable" in prediction:
        return 0.0
    return float(any(prediction.lower() == answer.lower() for answer in _answer_list(record)))


# -------------------------------------------------------------------------------- grounding (IoU)


def coin_box(text: str) -> list[float] | None:
    """The box CoIN's grounding script reads from generated text, or None when it cannot.

    Brackets are removed, then the first and last characters are dropped (sic: meant for the
    brackets, so ``"[0.1, 0.2, 0.5, 0.78]"`` reads as ``0.1, 0.2, 0.5, 0.7``), and the rest must be
    four comma-separated floats.
    """
    inner = text.replace("[", "").replace("]", "")[1:-1]
    try:
        box = [float(x) for x in inner.split(",")]
    except ValueError:
        return None
    return box if len(box) == 4 else None


_NUMBER = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


def parse_box(text: str) -> list[float] | None:
    """The first ``[x1, y1, x2, y2]`` written in `text` (four numbers in brackets), or None."""
    match = _BOX.search(text)
    return [float(x) for x in match.groups()] if match else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 for an empty union), as CoIN's."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_box(record: Record) -> list[float]:
    box = record.get("answer_bbox", record.get("answer"))
    try:
        if isinstance(box, str):
            values = [float(x) for x in box.replace("[", "").replace("]", "").split(",")]
        else:
            values = [float(x) for x in box]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4:
        raise DataError(f"{record_name(record)}: needs 'answer_bbox' as [x1, y1, x2, y2], got {box!r}.")
    return values


def _grounding_iou(prediction: str, record: Record) -> float:
    """Grounding (RefCOCO/+/g) in CoIN: the box read by `coin_box` has IoU > 0.5 with ``answer_bbox``.

    Source: zackschen/CoIN ETrain/Eval/LLaVA/CoIN/eval_grounding.py. Coordinates are LLaVA's: the
    image padded to a square and normalised by its longer side, for prediction and reference alike
    (the script rescales both by that side, which leaves the IoU unchanged). An unreadable answer is
    skipped but counted in the total, i.e. wrong. The paper describes the box and IoU > 0.5; the
    script also drops the last character of the last coordinate (`coin_box`), which this follows:
    `box_iou` is the same rule with the box read as written.
    """
    box = coin_box(prediction)
    return float(box is not None and box_iou(box, _reference_box(record)) > 0.5)


def _box_iou(prediction: str, record: Record) -> float:
    """The grounding rule with the box parsed as written: the first ``[x1, y1, x2, y2]``, IoU > 0.5.

    Source: this library, after zackschen/CoIN ETrain/Eval/LLaVA/CoIN/eval_grounding.py without its
    character slicing; not comparable with CoIN's tables (see ``grounding_iou``).
    """
    box = parse_box(prediction)
    return float(box is not None and box_iou(box, _reference_box(record)) > 0.5)


# --------------------------------------------------------------------------- MLLM-CL domain rules


def _ai2d_match(prediction: str, record: Record) -> float:
    """MLLM-CL's RS and AD: lower case; a multi-word answer must be a substring of the prediction;
    a one-word answer (periods removed) must appear as a word (after a space, or before a space, a
    period or a comma) of a multi-word prediction, or be a substring of a one-word prediction.

    Source: bjzhb666/MLLM-CL ETrain/Eval/LLaVA/CoIN/eval_ai2d.py (the same file as Ghy0501/MCITlib
    LoRA-FT/llava/eval/CoIN/eval_ai2d.py). "Unanswerable" in the prediction is wrong.
    """
    if "Unanswerable" in prediction:
        return 0.0
    predicted, answer = prediction.lower(), str(_answer(record)).lower()
    if " " in answer:
        return float(answer in predicted)
    answer = answer.replace(".", "")
    if " " in predicted:
        return float(
            any(form in predicted for form in (" " + answer, answer + " ", answer + ".", answer + ","))
        )
    return float(answer in predicted)


def _pvqa_contains(prediction: str, record: Record) -> float:
    """MLLM-CL's Med: the lower-cased answer is a substring of the lower-cased prediction.

    Source: bjzhb666/MLLM-CL ETrain/Eval/LLaVA/CoIN/eval_pvqa.py (= Ghy0501/MCITlib
    LoRA-FT/llava/eval/CoIN/eval_pvqa.py, where exact match is commented out with a TODO).
    "Unanswerable" in the prediction is wrong.
    """
    if "Unanswerable" in prediction:
        return 0.0
    return float(str(_answer(record)).lower() in prediction.lower())


_SCI_EXACT_SOURCES = ("AI2D", "TQA", "VQA", "SciVerse")


def _sci_match(prediction: str, record: Record) -> float:
    """MLLM-CL's Sci: by source data set, read from the image file name's prefix (before ``_``).

    AI2D, TQA, VQA and SciVerse images: lower-cased equality. MapQA (any other prefix): a question
    with "Which states" scores the share of the answer's comma-separated states that are items of
    the prediction split at commas (partial credit); other questions need the answer as a substring.
    Source: bjzhb666/MLLM-CL ETrain/Eval/LLaVA/CoIN/eval_sci.py (= Ghy0501/MCITlib
    LoRA-FT/llava/eval/CoIN/eval_sci.py). Needs the record's ``image`` path and its question.
    """
    if "Unanswerable" in prediction:
        return 0.0
    image = _field(record, "image", "sci_match")
    if not isinstance(image, str):
        raise DataError(
            f"{record_name(record)}: the 'sci_match' metric reads the source data set from the image's "
            "file name (AI2D_..., TQA_..., MapQA...); give the image as a path."
        )
    predicted, answer = prediction.lower(), str(_answer(record)).lower()
    if image.split("/")[-1].split("_")[0] in _SCI_EXACT_SOURCES:
        return float(answer == predicted)
    if "Which states" in _question(record):  # MapQA's list answers: the share of listed states found
        listed = predicted.split(",")
        expected = answer.split(",")
        return sum(state in listed for state in expected) / len(expected)
    return float(answer in predicted)


def _finvis_match(prediction: str, record: Record) -> float:
    """MLLM-CL's Fin: the prediction, lower-cased without spaces or periods, equals the lower-cased answer.

    Source: bjzhb666/MLLM-CL ETrain/Eval/LLaVA/CoIN/eval_finvis.py (= Ghy0501/MCITlib
    LoRA-FT/llava/eval/CoIN/eval_finvis.py; its answers are option letters or true/false).
    """
    if "Unanswerable" in prediction:
        return 0.0
    return float(prediction.lower().replace(" ", "").replace(".", "") == str(_answer(record)).lower())


# -------------------------------------------------------------------------- MLLM-CL ability rules

_HMER = "Handwritten Mathematical Expression Recognition"


def _ocrbench(prediction: str, record: Record) -> float:
    """MLLM-CL's OCR (OCRBench): one of the answers is a substring of the prediction.

    Lower-cased, stripped, newlines removed; for ``answer_type`` "Handwritten Mathematical
    Expression Recognition", case kept and spaces removed instead. Source: bjzhb666/MLLM-CL
    ETrain/Eval/LLaVA/CoIN/eval_ocr.py. The script reports "Final Score Norm" = hits / 10, which is
    this accuracy (in %) on OCRBench's 1,000 questions.
    """
    answers = _answer_list(record)
    if record.get("answer_type") == _HMER:
        predicted = prediction.strip().replace(" ", "").replace("\n", "")
        return float(any(a.strip().replace(" ", "").replace("\n", "") in predicted for a in answers))
    predicted = prediction.lower().strip().replace("\n", "")
    return float(any(a.lower().strip().replace("\n", "") in predicted for a in answers))


_MATH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def _infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_option``: the one option letter written as a word, ``Z`` for a refusal."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in _MATH_REFUSALS):
        return "Z"
    for mark in ".()[],:;!*#{}":
        answer = answer.replace(mark, " ")
    words = answer.split()
    found = [letter for letter in choices if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    return None


def _infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: the one option whose text appears in the answer."""
    found = [letter for letter, text in choices.items() if str(text).lower() in answer.lower()]
    return found[0] if len(found) == 1 else None


def _mathvista(prediction: str, record: Record) -> float:
    """MLLM-CL's Math (MathVista): the rule-based ("prefetch") answer extraction equals the answer.

    Multiple choice (``question_type`` "multi_choice"): exactly one option letter written as a word,
    else exactly one option text contained in the prediction, must be ``answer_option``. Free form:
    ``int(prediction)`` or ``float(prediction)`` (by ``answer_type``) must equal ``answer``. Source:
    bjzhb666/MLLM-CL ETrain/Eval/LLaVA/CoIN/eval_math.py (VLMEvalKit's post_check / can_infer).
    Difference: where that extraction finds nothing (or 0), the script asks GPT-4o-mini to extract
    the answer; offline that counts as wrong, so this is a lower bound of the official score, equal
    to it when every answer is extractable by rule. Text and list answers always need the judge.
    """
    kind = _field(record, "question_type", "mathvista")
    if kind == "multi_choice":
        choices = _field(record, "choices", "mathvista")
        if isinstance(choices, str):
            choices = ast.literal_eval(choices)
        options = {chr(65 + i): value for i, value in enumerate(choices)}
        found = _infer_option(prediction, options) or _infer_text(prediction, options)
        return float(bool(found) and found == _field(record, "answer_option", "mathvista"))
    answer_type = _field(record, "answer_type", "mathvista")
    answer = _answer(record)
    try:
        if answer_type == "integer":
            value = int(prediction)
            return float(bool(value) and value == int(answer))  # a prefetched 0 goes to the judge (sic)
        if answer_type == "float":
            value = float(prediction)
            return float(bool(value) and value == float(answer))
    except ValueError:
        return 0.0
    return float(str(answer) == "None")  # sic: text and list answers never prefetch (None == answer)


def _cvbench_contains(prediction: str, record: Record) -> float:
    """MLLM-CL's VP (CV-Bench): the answer is a substring of the prediction, both squeezed.

    Squeezed: lower case, stripped, spaces, newlines and periods removed. Source:
    bjzhb666/MLLM-CL ETrain/Eval/LLaVA/CoIN/eval_sat.py.
    """

    def squeeze(text: str) -> str:
        return text.lower().strip().replace(" ", "").replace("\n", "").replace(".", "")

    return float(squeeze(str(_answer(record))) in squeeze(prediction))


def _mmt_option(prediction: str, record: Record) -> float:
    """MLLM-CL's APP (MMT-Bench GUI): the stripped, upper-cased prediction is the answer's letter.

    Source: bjzhb666/MLLM-CL ETrain/Eval/LLaVA/CoIN/convert_result_to_submission.py, which writes
    ``text.strip().upper()`` as the option for MMT-Bench's evaluation server; the official number
    comes from that server, this is the same comparison made offline.
    """
    return float(prediction.strip().upper() == str(_answer(record)).strip().upper())


# ---------------------------------------------------------------------- captioning (coco-caption)

_PTB_DROPPED = frozenset({"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CAPTION_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b|(?:\w\.){2,}|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\w+(?:[-./']\w+)*|\.\.\.|--|\S"
)


def caption_tokens(text: str) -> list[str]:
    """Lower-cased words as coco-caption's PTB tokenizer gives them, its punctuation dropped.

    An approximation of the Java Stanford tokenizer pycocoevalcap runs (``-lowerCase``): clitics
    (``n't``, ``'s``...) split off, ``u.s.``, ``1,000``, ``black-and-white`` and ``a/b`` kept whole, quotes
    and the punctuation of its ``PUNCTUATIONS`` list dropped, and brackets kept as ``-lrb-``... (its
    list names them in upper case, so after lower-casing they survive).
    """
    text = re.sub(r"(\w)(n't|'(?:s|re|ve|ll|d|m))\b", r"\1 \2", text.lower().replace("\n", " "))
    tokens = (_PTB_BRACKETS.get(token, token) for token in _CAPTION_TOKEN.findall(text))
    return [token for token in tokens if token not in _PTB_DROPPED]


def _captions(record: Record) -> list[str]:
    for key in ("captions", "answers"):
        if isinstance(record.get(key), (list, tuple)) and record[key]:
            return [str(c) for c in record[key]]
    return _answer_list(record)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> list[float]:
    """BLEU-1..4 over a corpus as coco-caption's ``BleuScorer`` (``option="closest"``) computes it.

    Clipped n-gram matches and n-gram counts are summed over the corpus; the reference length of
    each hypothesis is its closest reference's; one brevity penalty for the corpus.
    """
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * 4, [0] * 4
    test_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        max_counts: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            for gram, count in _ngrams(ref, 4).items():
                max_counts[gram] = max(max_counts[gram], count)
        length = len(hypothesis)
        test_length += length
        ref_length += min((abs(len(ref) - length), len(ref)) for ref in refs)[1]
        for gram, count in _ngrams(hypothesis, 4).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        for k in range(4):
            guess[k] += max(0, length - k)
    scores, product = [], 1.0
    for k in range(4):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_length + tiny) / (ref_length + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypothesis: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """coco-caption's ROUGE-L of one hypothesis: F-measure (beta 1.2) of the best LCS precision and recall."""
    if not hypothesis:
        return 0.0
    lcs = [_lcs(ref, hypothesis) for ref in references]
    precision = max(n / len(hypothesis) for n in lcs)
    recall = max((n / len(ref) if ref else 0.0) for n, ref in zip(lcs, references, strict=True))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def corpus_cider(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], sigma: float = 6.0
) -> float:
    """CIDEr-D as coco-caption's ``CiderScorer`` computes it (what pycocoevalcap reports as "CIDEr").

    TF-IDF vectors of 1..4-grams (document frequency over the corpus's reference sets), clipped
    cosine similarity per n, a Gaussian length penalty (sigma 6), the mean over n and references,
    times 10; the corpus score is the mean over hypotheses. Its length is counted in bigrams (sic).
    """
    frequency: Counter[tuple[str, ...]] = Counter()
    ref_counts = [[_ngrams(ref, 4) for ref in refs] for refs in references]
    for counts in ref_counts:
        frequency.update({gram for count in counts for gram in count})
    log_documents = math.log(float(len(references)))

    def vector(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            vec[n][gram] = tf * (log_documents - math.log(max(1.0, frequency[gram])))
            norm[n] += vec[n][gram] ** 2
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hypothesis, counts in zip(hypotheses, ref_counts, strict=True):
        vec, norm, length = vector(_ngrams(hypothesis, 4))
        total = [0.0] * 4
        for ref in counts:
            vec_ref, norm_ref, length_ref = vector(ref)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for n in range(4):
                value = sum(min(weight, vec_ref[n].get(gram, 0.0)) * vec_ref[n].get(gram, 0.0)
                            for gram, weight in vec[n].items())  # fmt: skip
                if norm[n] != 0 and norm_ref[n] != 0:
                    value /= norm[n] * norm_ref[n]
                total[n] += value * penalty
        scores.append(sum(total) / 4 / len(counts) * 10.0)
    return sum(scores) / len(scores)


def _tokenized(predictions: Sequence[str], records: Sequence[Record]) -> tuple[list, list]:
    return [caption_tokens(p) for p in predictions], [
        [caption_tokens(c) for c in _captions(r)] for r in records
    ]


def _bleu(n: int) -> Callable[[list[str], list[Record]], float]:
    def score(predictions: list[str], records: list[Record]) -> float:
        """Corpus BLEU-n of the captions (`corpus_bleu`) on `caption_tokens`.

        Source: tylin/coco-caption pycocoevalcap/bleu/bleu_scorer.py, one of the seven numbers that
        Ghy0501/MCITlib LoRA-FT/llava/eval/CoIN/eval_caption.py averages; the tokenizer is an
        approximation of its Java PTB tokenizer, so values can differ slightly from pycocoevalcap's.
        """
        return corpus_bleu(*_tokenized(predictions, records))[n - 1]

    return score


def _rouge_l(predictions: list[str], records: list[Record]) -> float:
    """Mean ROUGE-L of the captions (`rouge_l`) on `caption_tokens`.

    Source: tylin/coco-caption pycocoevalcap/rouge/rouge.py (averaged by Ghy0501/MCITlib
    LoRA-FT/llava/eval/CoIN/eval_caption.py); approximate tokenizer as for BLEU.
    """
    hypotheses, references = _tokenized(predictions, records)
    return sum(rouge_l(h, r) for h, r in zip(hypotheses, references, strict=True)) / len(hypotheses)


def _cider(predictions: list[str], records: list[Record]) -> float:
    """Corpus CIDEr-D of the captions (`corpus_cider`) on `caption_tokens`; it can exceed 1 (up to 10).

    Source: tylin/coco-caption pycocoevalcap/cider/cider_scorer.py (averaged by Ghy0501/MCITlib
    LoRA-FT/llava/eval/CoIN/eval_caption.py); approximate tokenizer as for BLEU.
    """
    return corpus_cider(*_tokenized(predictions, records))


def _coco_caption_lacking() -> str | None:
    import importlib.util
    import shutil

    lacking = []
    if importlib.util.find_spec("pycocoevalcap") is None:
        lacking.append("pycocoevalcap (pip install pycocoevalcap)")
    if shutil.which("java") is None:
        lacking.append("a Java runtime (java on PATH)")
    if not lacking:
        return None
    return (
        f"the 'caption' metric needs {' and '.join(lacking)}: pycocoevalcap's tokenizer and METEOR are "
        "Java programs; 'cider', 'bleu_4' and 'rouge_l' are pure Python"
    )


def _coco_caption(predictions: list[str], records: list[Record]) -> float:
    """UCIT's Flickr30k and VizWiz-Caption: the mean of BLEU-1..4, METEOR, ROUGE-L and CIDEr.

    Source: Ghy0501/MCITlib LoRA-FT/llava/eval/CoIN/eval_caption.py (= Ghy0501/HiDe-LLaVA
    llava/eval/eval_caption.py), its "Average", computed by pycocoevalcap on its PTB-tokenized
    captions; the references are the record's ``captions`` (or ``answers``, or ``answer``). METEOR
    and the tokenizer are Java programs: this needs ``pycocoevalcap`` and Java, and raises
    ImportError naming the pure-Python alternatives without them. CIDEr can exceed 1, so this can
    too (rarely). The LLM-judge score in that script is commented out.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ImportError(
            "The 'caption' metric is UCIT's official one (MCITlib's eval_caption.py): pycocoevalcap's PTB "
            "tokenizer, then the mean of BLEU-1..4, METEOR, ROUGE-L and CIDEr. It needs `pip install "
            "pycocoevalcap` and a Java runtime (the tokenizer and METEOR are Java programs). Without them, "
            "score 'cider', 'bleu_4' or 'rouge_l' (pure Python, with an approximate tokenizer)."
        ) from None
    tokenizer = PTBTokenizer()
    references = tokenizer.tokenize(
        {i: [{"caption": c} for c in _captions(r)] for i, r in enumerate(records)}
    )
    hypotheses = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    values = list(Bleu(4).compute_score(references, hypotheses)[0])
    values += [scorer.compute_score(references, hypotheses)[0] for scorer in (Meteor(), Rouge(), Cider())]
    return sum(float(v) for v in values) / len(values)


# ------------------------------------------------------------------------------------- registry


def _scorers(*scorers: Scorer) -> dict[str, Scorer]:
    return {scorer.name: scorer for scorer in scorers}


SCORERS: dict[str, Scorer] = _scorers(
    Scorer(
        "exact_match",
        "normalised answer equals a normalised reference (lower case, no punctuation or articles, digits)",
        "cmoe_adapters/evaluation.py::exact_match (this library's default; no benchmark's rule)",
        sample=_exact_match,
    ),
    Scorer(
        "vqa",
        "m4c soft accuracy: min(#matching of the 10 normalised human answers / 3, 1), leave-one-out mean",
        f"{_COIN}: ETrain/Eval/LLaVA/CoIN/m4c_evaluator.py (TextVQAAccuracyEvaluator), "
        "run by ETrain/Eval/LLaVA/CoIN/eval_textvqa.py",
        sample=_vqa,
    ),
    Scorer(
        "option_letter",
        "ScienceQA: the letter, 'B. ...' or the first one-character word, as index, equals the answer's",
        f"{_COIN}: ETrain/Eval/LLaVA/CoIN/eval_science_qa.py",
        sample=_option_letter,
    ),
    Scorer(
        "case_insensitive",
        "prediction.upper() == answer.upper(), one reference answer",
        f"{_COIN}: ETrain/Eval/LLaVA/CoIN/eval_vqav2.py and eval_vizwiz.py; "
        f"{_MCITLIB}: LoRA-FT/llava/eval/CoIN/eval_deepseek_r1.py (UCIT)",
        sample=_case_insensitive,
    ),
    Scorer(
        "gqa",
        "prediction.rstrip('.').lower() == answer (GQA's answers are lower case)",
        f"{_COIN}: ETrain/Eval/LLaVA/CoIN/convert_gqa_for_eval.py then eval_gqa.py (balanced accuracy)",
        sample=_gqa,
    ),
    Scorer(
        "either_contains",
        "the answer is a substring of the prediction or the prediction of the answer (case-sensitive)",
        f"{_COIN}: ETrain/Eval/LLaVA/CoIN/eval_ImagetNet.py",
        sample=_either_contains,
    ),
    Scorer(
        "ocrvqa",
        "no 'Unanswerable' in the prediction and prediction.lower() == answer.lower()",
        f"{_COIN}: ETrain/Eval/LLaVA/CoIN/eval_ocrvqa.py",
        sample=_ocrvqa,
    ),
    Scorer(
        "grounding_iou",
        "box read as CoIN's script reads it (first/last character dropped), IoU > 0.5; unreadable = wrong",
        f"{_COIN}: ETrain/Eval/LLaVA/CoIN/eval_grounding.py",
        sample=_grounding_iou,
    ),
    Scorer(
        "box_iou",
        "the first [x1, y1, x2, y2] written in the prediction, IoU > 0.5; none = wrong",
        f"this library: {_COIN}'s eval_grounding.py rule with the box parsed as written",
        sample=_box_iou,
    ),
    Scorer(
        "caption",
        "mean of BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap, PTB tokenizer), corpus-level",
        f"{_MCITLIB}: LoRA-FT/llava/eval/CoIN/eval_caption.py (the 'Average' it writes)",
        corpus=_coco_caption,
        lacking=_coco_caption_lacking,
        stand_in="cider",
    ),
    *(
        Scorer(
            f"bleu_{n}",
            f"corpus BLEU-{n} as coco-caption's BleuScorer ('closest' reference length)",
            "tylin/coco-caption: pycocoevalcap/bleu/bleu_scorer.py (used by MCITlib's eval_caption.py)",
            corpus=_bleu(n),
        )
        for n in (1, 2, 3, 4)
    ),
    Scorer(
        "rouge_l",
        "mean over records of ROUGE-L (LCS F-measure, beta 1.2, best precision and recall over references)",
        "tylin/coco-caption: pycocoevalcap/rouge/rouge.py (used by MCITlib's eval_caption.py)",
        corpus=_rouge_l,
    ),
    Scorer(
        "cider",
        "CIDEr-D: clipped TF-IDF n-gram cosine, length penalty, x10, document frequencies of the corpus",
        "tylin/coco-caption: pycocoevalcap/cider/cider_scorer.py (used by MCITlib's eval_caption.py)",
        corpus=_cider,
    ),
    Scorer(
        "ai2d_match",
        "lower case; a multi-word answer is a substring; a one-word answer is a word of the prediction",
        f"{_MLLMCL}: ETrain/Eval/LLaVA/CoIN/eval_ai2d.py (same in {_MCITLIB} LoRA-FT/llava/eval/CoIN/)",
        sample=_ai2d_match,
    ),
    Scorer(
        "pvqa_contains",
        "no 'Unanswerable' in the prediction and the lower-cased answer is a substring of it",
        f"{_MLLMCL}: ETrain/Eval/LLaVA/CoIN/eval_pvqa.py (same in {_MCITLIB} LoRA-FT/llava/eval/CoIN/)",
        sample=_pvqa_contains,
    ),
    Scorer(
        "sci_match",
        "AI2D/TQA/VQA/SciVerse images: exact (lower case); MapQA: share of listed states, else substring",
        f"{_MLLMCL}: ETrain/Eval/LLaVA/CoIN/eval_sci.py (same in {_MCITLIB} LoRA-FT/llava/eval/CoIN/)",
        sample=_sci_match,
    ),
    Scorer(
        "finvis_match",
        "prediction lower-cased without spaces and periods == lower-cased answer",
        f"{_MLLMCL}: ETrain/Eval/LLaVA/CoIN/eval_finvis.py (same in {_MCITLIB} LoRA-FT/llava/eval/CoIN/)",
        sample=_finvis_match,
    ),
    Scorer(
        "ocrbench",
        "an answer is a substring of the prediction (lower case; handwritten formulas: case kept, no spaces)",
        f"{_MLLMCL}: ETrain/Eval/LLaVA/CoIN/eval_ocr.py (OCRBench)",
        sample=_ocrbench,
    ),
    Scorer(
        "mathvista",
        "MathVista's rule-based answer extraction (option letter or text; integer; float) equals the answer",
        f"{_MLLMCL}: ETrain/Eval/LLaVA/CoIN/eval_math.py (post_check / can_infer, the 'prefetch' path)",
        sample=_mathvista,
    ),
    Scorer(
        "cvbench_contains",
        "the answer is a substring of the prediction, both lower case without spaces, newlines, periods",
        f"{_MLLMCL}: ETrain/Eval/LLaVA/CoIN/eval_sat.py (CV-Bench)",
        sample=_cvbench_contains,
    ),
    Scorer(
        "mmt_option",
        "prediction.strip().upper() == the answer's option letter",
        f"{_MLLMCL}: ETrain/Eval/LLaVA/CoIN/convert_result_to_submission.py (MMT-Bench submission)",
        sample=_mmt_option,
    ),
)

BENCHMARK_METRICS: dict[str, dict[str, str]] = {
    # CoIN's 8 tasks, in its training order (scripts/LLaVA/Eval/*.sh of zackschen/CoIN)
    "CoIN": {
        "ScienceQA": "option_letter",
        "TextVQA": "vqa",
        "ImageNet": "either_contains",
        "GQA": "gqa",
        "VizWiz": "case_insensitive",
        "Grounding": "grounding_iou",
        "VQAv2": "case_insensitive",
        "OCRVQA": "ocrvqa",
    },
    # UCIT's 6 tasks, in MCITlib's order (LoRA-FT/scripts/CoIN/Train_UCIT/train_all.sh, Eval_UCIT/*.sh)
    "UCIT": {
        "ImageNet-R": "case_insensitive",
        "ArxivQA": "case_insensitive",
        "VizWiz": "caption",  # VizWiz-Caption here, not CoIN's VizWiz questions
        "IconQA": "case_insensitive",
        "CLEVR-Math": "case_insensitive",
        "Flickr30k": "caption",
    },
    # MLLM-CL's domain stream, in MCITlib's order (LoRA-FT/scripts/CoIN/Train_DCL/, Eval_MLLM_DCL/)
    "MLLM-DCL": {
        "RS": "ai2d_match",
        "Med": "pvqa_contains",
        "AD": "ai2d_match",
        "Sci": "sci_match",
        "Fin": "finvis_match",
    },
    # MLLM-CL's ability stream (bjzhb666/MLLM-CL scripts/LLaVA/Eval_ability/*.sh; not yet in MCITlib)
    "MLLM-ACL": {"OCR": "ocrbench", "Math": "mathvista", "VP": "cvbench_contains", "APP": "mmt_option"},
}

_TASK_ALIASES = {
    ("CoIN", "refcoco"): "Grounding",
    ("CoIN", "ocr-vqa"): "OCRVQA",
    ("UCIT", "imagenet"): "ImageNet-R",
}
_BENCHMARK_ALIASES = {"mllm-cl-domain": "MLLM-DCL", "mllm-cl-ability": "MLLM-ACL"}


def get_scorer(metric: str) -> Scorer:
    """The scorer named `metric`; an unknown name lists the known ones."""
    try:
        return SCORERS[metric]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown metric {metric!r}; known metrics: {', '.join(SCORERS)}.") from None


def score_predictions(metric: str, predictions: Sequence[str], records: Iterable[Record]) -> float:
    """Score `predictions` (``predictions[i]`` answering ``records[i]``) with the metric `metric`."""
    return get_scorer(metric).score_all(predictions, list(records))


def resolve_benchmark_task(benchmark: str, task: str) -> tuple[str, str]:
    """The canonical names of a benchmark and its task (any case; aliases such as RefCOCO, OCR-VQA).

    Unknown names raise `ValueError` listing the known ones. The loaders (`benchmarks`) and
    `benchmark_metric` resolve names through this one function.
    """
    by_name = {name.lower(): name for name in BENCHMARK_METRICS}
    name = _BENCHMARK_ALIASES.get(benchmark.lower(), by_name.get(benchmark.lower()))
    if name is None:
        raise ValueError(
            f"Unknown benchmark {benchmark!r}; known benchmarks: {', '.join(BENCHMARK_METRICS)}."
        )
    tasks = BENCHMARK_METRICS[name]
    found = {t.lower(): t for t in tasks}.get(task.lower()) or _TASK_ALIASES.get((name, task.lower()))
    if found is None:
        raise ValueError(f"{name} has no task {task!r}; its tasks: {', '.join(tasks)}.")
    return name, found


def benchmark_metric(benchmark: str, task: str) -> str:
    """The metric `task` of `benchmark` is scored with (names as in `BENCHMARK_METRICS`, any case)."""
    name, found = resolve_benchmark_task(benchmark, task)
    return BENCHMARK_METRICS[name][found]
