"""The benchmarks' released layouts (CoIN, UCIT, MLLM-CL) load into records their scorers can score.

The fixtures under tests/fixtures/benchmarks are small files in exactly the released layouts (see
`cmoe_adapters.benchmarks.LAYOUTS` for each file's source), with a tiny image (16x16) at every
path their records name; the recipes' `--tiny` checks run on them too (tests/test_recipes.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cmoe_adapters.benchmarks import LAYOUTS, find_split_file, load_benchmark_split, required_fields
from cmoe_adapters.data import DataError
from cmoe_adapters.scorers import benchmark_metric, score_predictions

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
# where each benchmark's files and images are, relative to its fixture folder (as in the releases)
ROOTS = {
    "CoIN": ("Instructions_Original", "cl_dataset"),
    "UCIT": ("", "datasets"),
    "MLLM-DCL": ("", None),  # images beside each task's test.json, the scripts' --image-folder
    "MLLM-ACL": ("", None),
}
TASKS = [(benchmark, task) for benchmark, tasks in LAYOUTS.items() for task in tasks]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fixtures (every task's splits, a tiny image at every path they name)."""
    root = tmp_path_factory.mktemp("benchmarks")
    shutil.copytree(FIXTURES, root, dirs_exist_ok=True)
    return root


def load(root: Path, benchmark: str, task: str, split: str = "test", **kwargs) -> list[dict]:
    files, images = ROOTS[benchmark]
    image_root = str(root / benchmark / images) if images else None
    return load_benchmark_split(benchmark, task, str(root / benchmark / files), image_root, split, **kwargs)


def reference_prediction(metric: str, record: dict) -> str:
    """What a perfect model answers: the record's own reference, written as the task's answers are."""
    if metric == "vqa":
        return record["answers"][0]
    if metric == "option_letter":
        answer = record["answer"]
        return "ABCDE"[answer] if isinstance(answer, int) else str(answer)
    if metric in ("grounding_iou", "box_iou"):
        return record["answer_bbox"]
    if metric == "caption":
        return record["captions"][0]
    if metric == "mathvista" and record["question_type"] == "multi_choice":
        return record["answer_option"]
    answer = record["answer"]
    return answer[0] if isinstance(answer, list) else str(answer)


@pytest.mark.parametrize(("benchmark", "task"), TASKS, ids=[f"{b}-{t}" for b, t in TASKS])
def test_every_task_loads_and_its_references_score_one(data: Path, benchmark: str, task: str) -> None:
    records = load(data, benchmark, task)
    metric = benchmark_metric(benchmark, task)
    assert records
    for record in records:
        assert {"question_id", "question"} <= set(record) and "text" not in record
        assert set(required_fields(metric, record)) <= set(record)
        assert record.get("image") is None or os.path.isfile(record["image"])
    predictions = [reference_prediction(metric, record) for record in records]
    # the caption average needs pycocoevalcap and Java; ROUGE-L reads the same references
    scored_with = "rouge_l" if metric == "caption" else metric
    assert score_predictions(scored_with, predictions, records) == pytest.approx(1.0)


def test_coin_joins_the_references_its_scripts_read_from_cl_dataset(data: Path) -> None:
    textvqa = load(data, "CoIN", "TextVQA")
    assert textvqa[0]["answers"][:2] == ["dakota", "dakota"] and len(textvqa[0]["answers"]) == 10
    assert textvqa[0]["answer"] == "dakota" and textvqa[0]["question"].startswith("what is the brand")
    assert score_predictions("vqa", ["dakota digital", "Copenhagen."], textvqa) == pytest.approx(
        (0.6 + 1) / 2
    )
    science = load(data, "CoIN", "ScienceQA")
    assert science[0]["choices"] == ["West Virginia", "Louisiana", "Arizona", "Oklahoma"]
    assert science[0]["answer"] == 0 and science[1]["answer"] == 1  # problems.json's index, as the script
    assert science[1]["image"] is None  # a text-only question
    assert score_predictions("option_letter", ["A", "D"], science) == 0.5  # D is beyond 3 choices
    grounding = load(data, "CoIN", "Grounding")
    assert grounding[0]["answer_bbox"] == "[0.39, 0.0, 0.72, 0.23]" and grounding[0]["size"] == [640, 427]
    assert grounding[0]["image"] == str(
        data / "CoIN/cl_dataset/COCO2014/train2014/COCO_train2014_000000580957.jpg"
    )


def test_ucit_captions_come_from_the_coco_file_by_position(data: Path) -> None:
    vizwiz = load(data, "UCIT", "VizWiz")
    assert [len(r["captions"]) for r in vizwiz] == [3, 3]
    assert vizwiz[1]["captions"][0] == "A hand holding a can of soda."
    flickr = load(data, "UCIT", "Flickr30k")  # HiDe-LLaVA's names: test_3000.json, val_coco_type_3000.json
    assert flickr[0]["captions"][1] == "A man with glasses is wearing a beer can crocheted hat."


def test_mllm_cl_keeps_the_fields_its_scorers_read(data: Path) -> None:
    ocr = load(data, "MLLM-ACL", "OCR")
    assert ocr[1]["answer_type"] == "Handwritten Mathematical Expression Recognition"
    assert ocr[0]["image"] == str(data / "MLLM-ACL/OCR_test/images/IIIT5K_0.jpg")  # beside test.json
    math = load(data, "MLLM-ACL", "Math")
    assert math[0]["choices"] == "['True', 'False']" and math[1]["answer_type"] == "integer"
    vp = load(data, "MLLM-ACL", "VP")
    assert (vp[0]["type"], vp[0]["task"]) == ("2D", "Count")
    sci = load(data, "MLLM-DCL", "Sci")
    assert score_predictions("sci_match", ["b", "Texas"], sci) == pytest.approx((1 + 0.5) / 2)


@pytest.mark.parametrize(("benchmark", "task"), TASKS, ids=[f"{b}-{t}" for b, t in TASKS])
def test_train_splits_are_llava_conversations(data: Path, benchmark: str, task: str) -> None:
    records = load(data, benchmark, task, "train")
    assert records and all(r["conversations"][-1]["from"] == "gpt" for r in records)
    assert all(r["image"] is None or os.path.isfile(r["image"]) for r in records)


def test_a_split_is_found_from_its_file_its_task_folder_or_the_benchmark_root(data: Path, tmp_path) -> None:
    folder = data / "CoIN/Instructions_Original/TextVQA"
    expected = str(folder / "val.json")
    assert find_split_file("CoIN", "TextVQA", str(folder / "val.json")) == expected
    assert find_split_file("CoIN", "TextVQA", str(folder)) == expected
    assert find_split_file("coin", "textvqa", str(data / "CoIN/Instructions_Original")) == expected
    assert find_split_file("CoIN", "RefCOCO", str(data / "CoIN/Instructions_Original")).endswith(
        "Grounding/test.json"
    )
    assert find_split_file("MLLM-ACL", "Math", str(data / "MLLM-ACL")).endswith("Math_test/test.json")
    with pytest.raises(DataError, match=r"no CoIN GQA train file; looked for .*GQA/train\.json"):
        find_split_file("CoIN", "GQA", str(tmp_path), "train")


# ----------------------------------------------------------------------------------------- errors


def write(tmp_path: Path, name: str, records: object) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_a_missing_image_names_the_file_and_the_record(tmp_path: Path) -> None:
    path = write(
        tmp_path, "test.json", [{"question_id": "q7", "image": "gone.png", "text": "?", "answer": "x"}]
    )
    with pytest.raises(
        DataError, match=r"test\.json: record 0 \(q7\): image file .*gone\.png does not exist"
    ):
        load_benchmark_split("CoIN", "GQA", path, str(tmp_path))


def test_a_missing_field_names_the_record_and_what_the_metric_reads(tmp_path: Path) -> None:
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    ok = {"question_id": 0, "image": "a.png", "text": "box?", "answer_bbox": "[0.1, 0.1, 0.5, 0.5]"}
    path = write(tmp_path, "test.json", [ok, {"question_id": 1, "image": "a.png", "text": "box?"}])
    with pytest.raises(
        DataError,
        match=r"test\.json: record 1 \(1\): missing \['answer_bbox'\]; CoIN Grounding is scored with the "
        r"'grounding_iou' metric, which reads \['answer_bbox'\]",
    ):
        load_benchmark_split("CoIN", "Grounding", path, str(tmp_path))
    path = write(
        tmp_path, "test.json", [{"question_id": "a", "image": "a.png", "question": "?", "answer": "x"}]
    )
    with pytest.raises(DataError, match=r"record 0 \(a\): missing \['text'\]; CoIN GQA test records have"):
        load_benchmark_split("CoIN", "GQA", path, str(tmp_path))
    free = {
        "question_id": "testmini_9",
        "image": "a.png",
        "text": "?",
        "answer": "3",
        "question_type": "free_form",
    }
    path = write(tmp_path, "test.json", [free])
    with pytest.raises(DataError, match=r"missing \['answer_type'\]; MLLM-ACL Math .* 'mathvista'"):
        load_benchmark_split("MLLM-ACL", "Math", path, str(tmp_path))
    bad_box = {**ok, "answer_bbox": "[0.1, 0.2]"}
    with pytest.raises(DataError, match=r"record 0 \(0\): 'answer_bbox' must be \[x1, y1, x2, y2\]"):
        load_benchmark_split("CoIN", "Grounding", write(tmp_path, "test.json", [bad_box]), str(tmp_path))


def test_references_missing_from_the_side_file_are_named(tmp_path: Path) -> None:
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    path = write(tmp_path, "val.json", [{"question_id": 5, "image": "a.png", "text": "?", "answer": "x"}])
    with pytest.raises(
        DataError, match=r"val\.json: its scorer reads \['answers'\] .*TextVQA_0\.5\.1_val\.json"
    ):
        load_benchmark_split("CoIN", "TextVQA", path, str(tmp_path))
    annotations = write(
        tmp_path, "TextVQA_0.5.1_val.json", {"data": [{"question_id": 6, "answers": ["x"] * 10}]}
    )
    with pytest.raises(
        DataError, match=r"record 0 \(5\): .*TextVQA_0\.5\.1_val\.json has no entry for question_id 5"
    ):
        load_benchmark_split("CoIN", "TextVQA", path, str(tmp_path))
    write(tmp_path, "TextVQA_0.5.1_val.json", {"data": [{"question_id": 5, "answers": ["x"] * 3}]})
    with pytest.raises(DataError, match=r"record 0 \(5\): 'answers' must be the 10 human answers .* got 3"):
        load_benchmark_split("CoIN", "TextVQA", path, str(tmp_path), annotations=annotations)


def test_annotations_for_a_task_without_a_side_file_are_refused(data: Path) -> None:
    with pytest.raises(DataError, match=r"CoIN GQA's scorer reads its references from the test file"):
        load(data, "CoIN", "GQA", annotations=str(data / "CoIN/cl_dataset/ScienceQA/problems.json"))


def test_an_empty_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test\.json: the UCIT ArxivQA test split is empty"):
        load_benchmark_split("UCIT", "ArxivQA", write(tmp_path, "test.json", []))
    with pytest.raises(DataError, match=r"train\.json: the MLLM-DCL RS train split is empty"):
        load_benchmark_split("MLLM-DCL", "RS", write(tmp_path, "train.json", []), split="train")


def test_unknown_benchmarks_and_tasks_list_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Unknown benchmark 'CoOIN'; known benchmarks: CoIN, UCIT, MLLM-DCL"):
        load_benchmark_split("CoOIN", "GQA", str(tmp_path))
    with pytest.raises(DataError, match=r"UCIT has no task 'GQA'; its tasks: ImageNet-R, ArxivQA, VizWiz"):
        load_benchmark_split("UCIT", "GQA", str(tmp_path))


def test_a_run_file_task_of_a_benchmark_reads_its_files_and_is_scored_by_its_metric(data: Path) -> None:
    """``benchmark: CoIN`` on a task of a run file: its released test file, its metric by default."""
    from cmoe_adapters.cli import _task_data
    from cmoe_adapters.run_config import ConfigError, load_run_config

    coin = data / "CoIN"
    run = data / "run.yaml"
    model = "llava-hf/llava-1.5-7b-hf"  # a Hub id: evaluating needs no model to validate the run file
    tasks = f"""
      - {{name: TextVQA, benchmark: CoIN, eval: {coin}/Instructions_Original/TextVQA/val.json,
          image_root: {coin}/cl_dataset}}
      - {{name: RefCOCO, benchmark: coin, eval: {coin}/Instructions_Original/Grounding/test.json,
          image_root: {coin}/cl_dataset, metric: box_iou}}
    """
    run.write_text(f"model: {model}\ntasks:{tasks}")
    config = load_run_config(str(run), "eval")
    assert [(t.name, t.benchmark, t.metric) for t in config.tasks] == [
        ("TextVQA", "CoIN", "vqa"),  # the benchmark's rule by default
        ("RefCOCO", "CoIN", "box_iou"),  # an explicit metric wins
    ]
    records = _task_data(config, "eval")["TextVQA"]["eval"]
    assert records and all(len(record["answers"]) == 10 for record in records)
    run.write_text(f"model: {model}\ntasks:{tasks.replace('benchmark: coin', 'benchmark: CoIM')}")
    with pytest.raises(ConfigError) as error:
        load_run_config(str(run), "eval")
    assert any(
        "tasks[1].benchmark" in problem and "Unknown benchmark 'CoIM'" in problem
        for problem in error.value.problems
    )
