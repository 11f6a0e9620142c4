"""Every real-model example runs end to end with ``--tiny`` (tiny random model, synthetic data, CPU).

Each example runs in its own process, exactly as a user would start it, and must leave one adapter
folder per task and a results.json whose accuracy matrix is complete below the diagonal. To cover a
new example, add one line to `EXAMPLES`: the script, the tasks its ``--tiny`` run trains and the
options its ``--help`` must show, e.g.
``pytest.param("easy_vqa_continual.py", ["shape", "color"], ("--tiny", "--output-dir"), id="easy_vqa")``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(ROOT, "examples")

# What the real-model examples' --help must offer (the plain CPU examples need only the first two).
REAL_OPTIONS = ("--tiny", "--output-dir", "--preset", "--deepspeed", "--push-to-hub", "--hub-model-id")

# (script, the tasks its --tiny run trains in order, the options its --help must show)
EXAMPLES = [
    pytest.param("llava_coin.py", ["ScienceQA", "ImageNet", "Grounding"], REAL_OPTIONS, id="llava_coin"),
    pytest.param("qwen2vl_continual.py", ["colors", "shapes", "choices"], REAL_OPTIONS, id="qwen2vl"),
    pytest.param("easy_vqa_continual.py", ["shape", "color"], ("--tiny", "--output-dir"), id="easy_vqa"),
]
TIMEOUT_S = 400  # a hung run fails instead of blocking CI; --tiny runs take ~10-20 s


def run_example(script: str, output_dir: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        os.path.join(EXAMPLES_DIR, script),
        "--tiny",
        "--output-dir",
        output_dir,
        *extra,
    ]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize(("script", "tasks", "options"), EXAMPLES)
def test_example_runs_tiny_and_writes_every_task(script, tasks, options, tmp_path):
    output_dir = str(tmp_path / "out")
    finished = run_example(script, output_dir)
    assert finished.returncode == 0, (
        f"{script} --tiny failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-5000:]}"
    )

    for task in tasks:
        folder = os.path.join(output_dir, task)
        assert os.path.isfile(os.path.join(folder, "adapter_config.json")), f"no adapter saved for {task}"
        assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors")), (
            f"no weights saved for {task}"
        )
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    assert results["tasks"] == tasks
    matrix = results["accuracy_matrix"]
    assert [len(row) for row in matrix] == list(range(1, len(tasks) + 1)), (
        "one row per task, lower-triangular"
    )
    assert all(isinstance(value, float) and 0.0 <= value <= 1.0 for row in matrix for value in row)
    assert results["summary"]["bwt"] is not None
    assert "accuracy" in finished.stdout and "bwt" in finished.stdout, "the matrix and BWT are printed"


@pytest.mark.parametrize(("script", "tasks", "options"), EXAMPLES)
def test_example_help_describes_the_options(script, tasks, options, capsys, monkeypatch):
    name = f"example_{script[:-3]}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES_DIR, script))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # in this process, where torch and transformers are loaded already
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for option in options:
        assert option in shown, f"{script} --help does not mention {option}"


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_deepspeed_configs_follow_the_training_arguments(name):
    with open(os.path.join(EXAMPLES_DIR, "deepspeed", name), encoding="utf-8") as handle:
        config = json.load(handle)
    assert config["zero_optimization"]["stage"] == int(name[4])
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", f"{name}: {key} must be 'auto' so that it follows TrainingArguments"
    assert config["bf16"]["enabled"] == "auto"


def test_open_set_example_locates_by_image_and_leaves_unknown_inputs_to_the_base_model():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        os.path.join(EXAMPLES_DIR, "locate_open_set.py"),
        "--train",
        "200",
        "--test",
        "30",
    ]
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = finished.stdout.splitlines()
    for row in (
        "| digits | 100% | 0% | 0% | 0% |",
        "| patches | 0% | 100% | 0% | 0% |",
        "| stripes | 0% | 0% | 100% | 0% |",
    ):
        assert row in lines, finished.stdout
    assert "| unknown: patches_other_question | 0% | 0% | 0% | 100% |" in lines
    assert "open-set AUROC, patches_other_question: 1.000" in lines
    assert lines[-1].endswith("the unknown input's tokens equal the base model's: True")
