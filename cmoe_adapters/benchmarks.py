"""Benchmarks' released files -> the library's records, with every field their scorers read.

CoIN, UCIT and MLLM-CL each release one folder per task with a LLaVA conversation file for
training and a question file for testing, and some of their official scorers read references
from a second file (TextVQA's 10 answers, ScienceQA's choices, the captions of UCIT's caption
tasks). `load_benchmark_split` reads a task's files as released, joins that second file where the
scorer needs it, and checks that every record carries what the task's metric
(`scorers.benchmark_metric`) reads, so that a data problem is found when the data is loaded, not
after an evaluation has run. Errors are `DataError` naming the file and the record (index and id).

Layouts (field names as in the files; the scripts named in `LAYOUTS` read exactly these):

* training, every benchmark: LLaVA records ``{"id", "image", "conversations"}`` (`data.load_llava_records`);
* testing, every benchmark: a JSON list of ``{"question_id", "image", "text", ...}``, the scripts'
  ``model_*.py`` question files; ``text`` becomes the record's ``question``, the rest is kept;
* side files: CoIN TextVQA ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "answers"}]}``),
  CoIN ScienceQA ``problems.json`` (``{pid: {"choices", "answer"}}``), UCIT Flickr30k and VizWiz
  ``val_coco_type_3000.json`` (COCO captions whose ``image_id`` is the test record's 1-based
  position, as MCITlib's ``eval_caption.py`` numbers its predictions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .data import DataError, _resolve_image, load_llava_records, read_json, read_json_records
from .scorers import benchmark_metric, resolve_benchmark_task

Split = Literal["train", "test"]

_COIN = "zackschen/CoIN"
_MCITLIB = "Ghy0501/MCITlib"
_HIDE = "Ghy0501/HiDe-LLaVA"
_MLLMCL = "bjzhb666/MLLM-CL"


@dataclass(frozen=True)
class SideFile:
    """A file besides the test JSON that the benchmark's scorer reads references from.

    ``names`` are tried in the task's folder, then under ``image_root`` (CoIN keeps TextVQA's and
    ScienceQA's annotations with their images, in ``cl_dataset``); ``kind`` says how it is keyed.
    """

    names: tuple[str, ...]
    kind: Literal["textvqa", "scienceqa", "coco_captions"]
    fields: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Layout:
    """One task's released files: their names in the task's folder and the scripts that read them."""

    folders: Mapping[str, tuple[str, ...]]  # split -> the task's folder name(s) under a benchmark root
    files: Mapping[str, tuple[str, ...]]  # split -> file names in that folder, first found is used
    source: str
    side: SideFile | None = None
    images_optional: bool = False  # ScienceQA has text-only questions (no "image" key)
    images_beside_file: bool = False  # the script's --image-folder is the JSON file's own folder


def _coin(task: str, test: str = "test.json", side: SideFile | None = None, **kwargs: Any) -> Layout:
    return Layout(
        folders={"train": (task,), "test": (task,)},
        files={"train": ("train.json",), "test": (test, "test.json")},
        source=f"{_COIN}: scripts/LLaVA/Train/*.sh (--data_path playground/Instructions_Original/{task}/"
        f"train.json) and scripts/LLaVA/Eval/*.sh (--question-file .../{task}/{test})",
        side=side,
        **kwargs,
    )


def _ucit(task: str, side: SideFile | None = None) -> Layout:
    return Layout(
        folders={"train": (task,), "test": (task,)},
        files={
            "train": ("train.json", "train_4w.json", "train_brief_4w.json"),
            "test": ("test.json", "test_3000.json"),
        },
        source=f"{_MCITLIB}: LoRA-FT/configs/data_configs/UCIT/{task}.json (UCIT/{task}/train.json, "
        "test.json); "
        f"{_HIDE}: README.md (instructions/{task}/train_4w.json, test_3000.json)",
        side=side,
    )


def _mllm_cl(task: str, script: str, test_folders: tuple[str, ...] | None = None) -> Layout:
    return Layout(
        folders={"train": (task,), "test": test_folders or (task,)},
        files={"train": ("train.json",), "test": ("test.json",)},
        source=f"{_MLLMCL}: README.md (Dataset) and {script}",
        images_beside_file=True,
    )


_CAPTIONS = SideFile(
    ("val_coco_type_3000.json",),
    "coco_captions",
    ("captions",),
    f"{_MCITLIB}: LoRA-FT/llava/eval/CoIN/eval_caption.py (--annotation-file = anno_path); "
    f"{_HIDE}: scripts/HiDe/Eval_UCIT/eval_flickr30k.sh (Flickr30k-cap/val_coco_type_3000.json)",
)

LAYOUTS: dict[str, dict[str, Layout]] = {
    "CoIN": {
        "ScienceQA": _coin(
            "ScienceQA",
            side=SideFile(
                ("problems.json", "ScienceQA/problems.json"),
                "scienceqa",
                ("choices", "answer"),
                f"{_COIN}: ETrain/Eval/LLaVA/CoIN/eval_science_qa.py (--base-dir cl_dataset/ScienceQA)",
            ),
            images_optional=True,
        ),
        "TextVQA": _coin(
            "TextVQA",
            test="val.json",
            side=SideFile(
                ("TextVQA_0.5.1_val.json", "TextVQA/TextVQA_0.5.1_val.json"),
                "textvqa",
                ("answers",),
                f"{_COIN}: ETrain/Eval/LLaVA/CoIN/eval_textvqa.py (--annotation-file "
                "cl_dataset/TextVQA/TextVQA_0.5.1_val.json)",
            ),
        ),
        "ImageNet": _coin("ImageNet"),
        "GQA": _coin("GQA"),
        "VizWiz": _coin("VizWiz", test="val.json"),
        "Grounding": _coin("Grounding"),
        "VQAv2": _coin("VQAv2", test="val.json"),
        "OCRVQA": _coin("OCRVQA"),
    },
    "UCIT": {
        "ImageNet-R": _ucit("ImageNet-R"),
        "ArxivQA": _ucit("ArxivQA"),
        "VizWiz": _ucit("VizWiz", side=_CAPTIONS),
        "IconQA": _ucit("IconQA"),
        "CLEVR-Math": _ucit("CLEVR-Math"),
        "Flickr30k": _ucit("Flickr30k", side=_CAPTIONS),
    },
    "MLLM-DCL": {
        "RS": _mllm_cl("RS", "scripts/LLaVA/Eval_dom/1_eval_remotesensing.sh"),
        "Med": _mllm_cl("Med", "scripts/LLaVA/Eval_dom/2_eval_medical.sh"),
        "AD": _mllm_cl("AD", "scripts/LLaVA/Eval_dom/3_eval_drivelm.sh"),
        "Sci": _mllm_cl("Sci", "scripts/LLaVA/Eval_dom/4_eval_sci.sh"),
        "Fin": _mllm_cl("Fin", "scripts/LLaVA/Eval_dom/5_eval_financial.sh"),
    },
    "MLLM-ACL": {
        "OCR": _mllm_cl("OCR", "scripts/LLaVA/Eval_ability/1_eval_OCR.sh", ("OCR_test",)),
        "Math": _mllm_cl("Math", "scripts/LLaVA/Eval_ability/2_eval_math.sh", ("Math_test", "math_test")),
        "VP": _mllm_cl("VP", "scripts/LLaVA/Eval_ability/3_eval_VSR.sh", ("VP_test", "CV-Benchv2")),
        "APP": _mllm_cl("APP", "scripts/LLaVA/Eval_ability/4_eval_APP.sh", ("APP_test",)),
    },
}

# What each metric reads from a test record besides the prediction (scorers.py, per scorer's docstring)
_METRIC_FIELDS: dict[str, tuple[str, ...]] = {
    "exact_match": ("answer",),
    "vqa": ("answers",),
    "option_letter": ("answer", "choices"),
    "case_insensitive": ("answer",),
    "gqa": ("answer",),
    "either_contains": ("answer",),
    "ocrvqa": ("answer",),
    "grounding_iou": ("answer_bbox",),
    "box_iou": ("answer_bbox",),
    "caption": ("captions",),
    "ai2d_match": ("answer",),
    "pvqa_contains": ("answer",),
    "sci_match": ("answer", "image"),
    "finvis_match": ("answer",),
    "ocrbench": ("answer", "answer_type"),
    "mathvista": ("question_type", "answer"),  # and by question_type: see `required_fields`
    "cvbench_contains": ("answer",),
    "mmt_option": ("answer",),
}


def layout(benchmark: str, task: str) -> tuple[str, str, Layout]:
    """The canonical benchmark and task names and the task's `Layout`; unknown names list the known.

    Names resolve as `scorers.benchmark_metric` resolves them (any case; RefCOCO, OCR-VQA...).
    """
    try:
        name, found = resolve_benchmark_task(benchmark, task)  # the scorers' names, or an error listing them
    except ValueError as error:
        raise DataError(str(error)) from None
    return name, found, LAYOUTS[name][found]


def required_fields(metric: str, record: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The record fields `metric` reads; MathVista's depend on the record's ``question_type``."""
    fields = _METRIC_FIELDS.get(metric, ("answer",))
    if metric == "mathvista" and record is not None:
        if record.get("question_type") == "multi_choice":
            fields = (*fields, "choices", "answer_option")
        else:
            fields = (*fields, "answer_type")
    return fields


def find_split_file(benchmark: str, task: str, path: str, split: Split = "test") -> str:
    """The split's file: `path` itself, or the released file name in `path` or in its task folder.

    `path` may be the JSON file, the task's folder (``.../Instructions_Original/GQA``) or the
    benchmark's root (``.../Instructions_Original``, ``.../UCIT``, ``.../Domain_data``).
    """
    name, task, spec = layout(benchmark, task)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or folder (the {name} {task} {split} file or its folder).")
    tried = []
    for folder in ("", *spec.folders[split]):
        for file in spec.files[split]:
            candidate = os.path.join(path, folder, file)
            tried.append(candidate)
            if os.path.isfile(candidate):
                return candidate
    raise DataError(f"{path}: no {name} {task} {split} file; looked for {', '.join(tried)}.")


def load_benchmark_split(
    benchmark: str,
    task: str,
    path: str,
    image_root: str | None = None,
    split: Split = "test",
    annotations: str | None = None,
    check_images: bool = True,
) -> list[dict]:
    """A task's released split as records, with every field its metric reads, checked.

    ``split="train"`` gives LLaVA conversation records (`data.load_llava_records`);
    ``split="test"`` gives ``{"question_id", "image", "question", ...}`` with the test file's other
    fields kept (``answer``, ``answer_bbox``, ``size``, ``answer_type``...) and, where the task's
    scorer reads references from a side file, its fields joined in (``answers``, ``choices``,
    ``captions``): `annotations` names that file, else it is looked for beside the test file and
    under `image_root`. Images are resolved against `image_root` (MLLM-CL: the test file's folder
    when not given, its scripts' ``--image-folder``) and must exist unless `check_images` is False.
    """
    name, task, spec = layout(benchmark, task)
    file = find_split_file(name, task, path, split)
    if image_root is None and spec.images_beside_file:
        image_root = os.path.dirname(file)
    if split == "train":
        records = load_llava_records(file, image_root=image_root, check_images=check_images)
        if not records:
            raise DataError(f"{file}: the {name} {task} train split is empty (no records).")
        return records
    raw = read_json_records(file)
    if not raw:
        raise DataError(f"{file}: the {name} {task} test split is empty (no records).")
    metric = benchmark_metric(name, task)
    if annotations is not None and spec.side is None:
        raise DataError(
            f"{name} {task}'s scorer reads its references from the test file; annotations= is unused."
        )
    side = None
    if spec.side is not None and (annotations is not None or _lack(raw, spec.side.fields)):
        side = _side_references(spec.side, annotations, file, image_root)
    records = []
    for index, record in enumerate(raw):
        where = _where(file, index, record)
        if not isinstance(record, dict):
            raise DataError(f"{where}: a test record is a JSON object, got {type(record).__name__}.")
        missing = [key for key in ("question_id", "text") if key not in record]
        if "image" not in record and not spec.images_optional:
            missing.append("image")
        if missing:
            raise DataError(
                f"{where}: missing {missing}; {name} {task} test records have 'question_id', 'image' and "
                f"'text' ({spec.source})."
            )
        out = {key: value for key, value in record.items() if key != "text"}
        out["question"] = record["text"]
        out["image"] = _resolve_image(file, record, index, image_root, check_images)
        if side is not None:
            out.update(side(index, record, where))
        _check_fields(metric, out, where, name, task, spec)
        records.append(out)
    return records


def _where(file: str, index: int, record: Any) -> str:
    name = record.get("question_id", record.get("id", "?")) if isinstance(record, dict) else "?"
    return f"{file}: record {index} ({name})"


def _check_fields(metric: str, record: dict, where: str, name: str, task: str, spec: Layout) -> None:
    needed = required_fields(metric, record)
    missing = [key for key in needed if record.get(key) is None]
    if missing:
        hint = f" (from {', '.join(spec.side.names)}: pass annotations=)" if spec.side else ""
        raise DataError(
            f"{where}: missing {missing}; {name} {task} is scored with the {metric!r} metric, which reads "
            f"{list(needed)}{hint}."
        )
    if metric == "vqa":
        answers = record["answers"]
        if not isinstance(answers, list) or len(answers) != 10:
            count = len(answers) if isinstance(answers, list) else type(answers).__name__
            raise DataError(
                f"{where}: 'answers' must be the 10 human answers for the 'vqa' metric, got {count}."
            )
    if metric in ("grounding_iou", "box_iou"):
        box = record["answer_bbox"]
        text = box if isinstance(box, str) else ",".join(str(x) for x in box) if isinstance(box, list) else ""
        try:
            values = [float(x) for x in text.replace("[", "").replace("]", "").split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise DataError(f"{where}: 'answer_bbox' must be [x1, y1, x2, y2], got {box!r}.")


# ---------------------------------------------------------------------------------- side files


def _find_side(side: SideFile, given: str | None, file: str, image_root: str | None) -> str:
    if given is not None:
        return given
    roots = [os.path.dirname(file)] + ([image_root] if image_root else [])
    tried = [os.path.join(root, name) for root in roots for name in side.names]
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise DataError(
        f"{file}: its scorer reads {list(side.fields)} from a separate file ({side.source}); none found at "
        f"{', '.join(tried)}. Pass annotations= with its path."
    )


SideLookup = Callable[[int, Mapping[str, Any], str], dict]


def _lack(raw: Sequence[Any], fields: Sequence[str]) -> bool:
    """Whether some test record lacks a field that the side file holds (then it must be read)."""
    return any(not isinstance(r, dict) or any(key not in r for key in fields) for r in raw)


def _side_references(side: SideFile, given: str | None, file: str, image_root: str | None) -> SideLookup:
    """A function giving, per test record, the fields the side file holds for it."""
    path = _find_side(side, given, file, image_root)
    data = read_json(path)
    if side.kind == "textvqa":
        rows = data.get("data") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected TextVQA's annotation file, {{'data': [...]}}.")
        by_id = {str(row.get("question_id")): {"answers": row.get("answers")} for row in rows}
    elif side.kind == "scienceqa":
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected ScienceQA's problems.json, {{pid: problem}}.")
        by_id = {
            str(pid): {"choices": p.get("choices"), "answer": p.get("answer")} for pid, p in data.items()
        }
    else:  # COCO captions; image_id = the test record's 1-based position (MCITlib eval_caption.py)
        rows = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected COCO caption annotations, {{'annotations': [...]}}.")
        captions: dict[str, list[str]] = {}
        for row in rows:
            captions.setdefault(str(row.get("image_id")), []).append(str(row.get("caption")))
        by_id = {key: {"captions": value} for key, value in captions.items()}

    def lookup(index: int, record: Mapping[str, Any], where: str) -> dict:
        key = str(index + 1) if side.kind == "coco_captions" else str(record.get("question_id"))
        found = by_id.get(key)
        if found is None:
            what = f"image_id {key}" if side.kind == "coco_captions" else f"question_id {key}"
            raise DataError(
                f"{where}: {path} has no entry for {what}; the scorer reads {list(side.fields)} there."
            )
        return found

    return lookup
