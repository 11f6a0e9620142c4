"""The shipped recipes: each validates against its benchmark's released layout and runs `--tiny`.

The fixtures under tests/fixtures/benchmarks are small files (and tiny images) in exactly the
released layouts, so a recipe's data paths, loaders, per-task settings and scorers are the ones a
real run uses; only the model is a tiny random one of the same architecture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cmoe_adapters import ContinualResult
from cmoe_adapters.cli import main
from cmoe_adapters.run_config import RECIPES_DIR, ConfigError, find_run_file, load_run_config, recipe_names
from cmoe_adapters.scorers import benchmark_metric, get_scorer

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
RECIPES = {
    "coin-llava15-7b": "CoIN",
    "ucit-llava15-7b": "UCIT",
    "ucit-llava15-7b-clmoe": "UCIT",
    "mllm-dcl-llava15-7b": "MLLM-DCL",
    "mllm-acl-llava15-7b": "MLLM-ACL",
}


def recipe(name: str) -> dict:
    with open(find_run_file(name), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_the_recipes_are_shipped_listed_and_documented(capsys):
    assert recipe_names() == sorted(RECIPES)
    assert os.path.realpath(ROOT / "recipes") == os.path.realpath(RECIPES_DIR), "recipes/ links to them"
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    page = (ROOT / "docs" / "reproducing.md").read_text(encoding="utf-8")
    for name, benchmark in RECIPES.items():
        assert f"`{name}`" in page
        assert name in listed
        data = recipe(name)
        assert data["data_root"] is None, "the user points it at their download"
        assert {task["benchmark"] for task in data["tasks"]} == {benchmark}
        assert data["model_class"] == "LlavaForConditionalGeneration"
        first = Path(find_run_file(name)).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# ") and first[2:] in listed


def test_every_recipe_validates_against_its_released_layout():
    """`cmoe train RECIPE --dry-run --data-root DIR`, as a user runs it (its own process: building
    DeepSpeed training arguments touches process-wide accelerate state)."""
    calls = [
        ["train", name, "--dry-run", "--data-root", str(FIXTURES / root)] for name, root in RECIPES.items()
    ]
    script = (
        "import sys\nfrom cmoe_adapters.cli import main\n"
        f"codes = [main(argv) for argv in {calls!r}]\nprint('codes', codes)\nsys.exit(max(codes))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("dry run: the run file and the data files are valid") == len(RECIPES)
    assert "  2. Med\n" in run.stdout and "own training: num_train_epochs=3\n" in run.stdout
    assert "scored by grounding_iou" in run.stdout and "scored by ai2d_match" in run.stdout


def test_a_recipe_without_its_data_root_says_how_to_give_it(capsys):
    assert main(["train", "coin-llava15-7b", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "data_root" in error and "not set" in error and "--data-root DIR" in error
    assert "file not found" not in error, "one problem, not one per data file"


def runnable(metric: str) -> str:
    """The metric --tiny scores with here: UCIT's captions need Java, absent on CI machines."""
    scorer = get_scorer(metric)
    return scorer.stand_in if scorer.missing() and scorer.stand_in else metric


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_runs_tiny_with_every_task_scored_by_its_benchmark_metric(name, tmp_path, capsys):
    out = tmp_path / "out"
    data_root = FIXTURES / RECIPES[name]
    assert main(["train", name, "--tiny", "--data-root", str(data_root), "--output-dir", str(out)]) == 0
    result = ContinualResult.load(str(out))
    tasks = [task["name"] for task in recipe(name)["tasks"]]
    assert result.tasks == tasks
    metrics = [benchmark_metric(RECIPES[name], task) for task in tasks]
    assert result.task_metrics == [runnable(metric) for metric in metrics]
    errors = capsys.readouterr().err
    for task, metric in zip(tasks, metrics, strict=True):
        if runnable(metric) != metric:  # said, never silent
            assert f"--tiny: {task} is scored by {runnable(metric)!r} here, not {metric!r}" in errors
    for index, row in enumerate(result.accuracy_matrix):
        assert len(row) == index + 1 and all(0.0 <= score <= 1.0 for score in row)
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "Last" in table and all(metric in table for metric in result.task_metrics)
    assert all((out / task / "adapter_config.json").is_file() for task in tasks)


def write_run(tmp_path: Path, tasks: str) -> Path:
    (tmp_path / "train.json").write_text(
        '[{"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}]'
    )
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {tmp_path}\ntraining:\n  output_dir: out\ntasks:\n{tasks}")
    (tmp_path / "config.json").write_text("{}")
    return path


def test_per_task_settings_are_checked_with_the_place_in_the_file(tmp_path):
    path = write_run(
        tmp_path,
        "  - {name: a, train: train.json, training: {bf16: true, num_train_epoch: 2, learning_rate: fast}}\n"
        "  - {name: b, train: train.json, training: {num_train_epochs: 3, eval_max_new_tokens: 64}}\n",
    )
    with pytest.raises(ConfigError) as error:
        load_run_config(str(path))
    problems = error.value.problems
    assert any(p.startswith("tasks[0].training.bf16") and "not a per-task setting" in p for p in problems)
    assert any("num_train_epoch" in p and "did you mean num_train_epochs" in p for p in problems)
    assert any(p.startswith("tasks[0].training.learning_rate") and "expected a number" in p for p in problems)
    assert len(problems) == 3

    path = write_run(tmp_path, "  - {name: b, train: train.json, training: {num_train_epochs: 3}}\n")
    assert load_run_config(str(path)).tasks[0].training == {"num_train_epochs": 3}


def test_tiny_needs_a_model_class_it_knows(tmp_path, capsys):
    path = write_run(tmp_path, "  - {name: a, train: train.json}\n")
    assert main(["train", str(path), "--tiny"]) == 2
    assert "--tiny: no tiny stand-in for model_class 'auto'" in capsys.readouterr().err


def test_a_metric_this_machine_lacks_is_a_problem_to_run_and_a_warning_to_check(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda program: None)
    path = write_run(tmp_path, "  - {name: a, train: train.json, eval: train.json, metric: caption}\n")
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.metric .*'caption' metric needs .*Java runtime"):
        load_run_config(str(path))
    checked = load_run_config(str(path), hardware_checks=False)  # a dry run on another machine
    assert any("tasks[0].metric" in warning and "Java" in warning for warning in checked.warnings)
