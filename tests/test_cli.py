"""`cmoe`: run-file validation (every kind of mistake, all reported at once, exit code 2), and the
whole command line on a tiny LLaVA saved to disk: train two tasks, eval, locate, push to a fake Hub."""

from __future__ import annotations

import json
import runpy
import sys
import textwrap

import pytest
from PIL import Image, ImageDraw

from cmoe_adapters import cli
from cmoe_adapters.easyvqa import build_tiny_llava
from cmoe_adapters.hub import PENDING_FILE, read_pending, write_pending
from cmoe_adapters.run_config import ConfigError, load_run_config

pytest_plugins = ["hub_server"]

COLORS = ("red", "blue", "green", "yellow")
SHAPES = ("circle", "rectangle")
RUN_HEAD = """\
model: tiny_llava
dtype: float32
image_root: data
adapter: {r: 4, num_experts: 2, top_k: 1, locator_steps: 30, locator_batch_size: 8}
"""
TRAINING = """\
training:
  output_dir: out
  max_steps: 6
  per_device_train_batch_size: 4
  learning_rate: 3e-2
  save_strategy: "no"
  report_to: none
  disable_tqdm: true
  use_cpu: true
  eval_max_new_tokens: 1
  eval_batch_size: 8
"""
RUN_TASKS = """\
tasks:
  - {name: color, train: data/color_train.json, eval: data/color_test.json}
  - {name: shape, train: data/shape_train.jsonl, eval: data/shape_test.json}
"""


def write_yaml(folder, text: str):
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def draw(path, color: str, shape: str) -> None:
    image = Image.new("RGB", (64, 64), "white")
    pen = ImageDraw.Draw(image)
    box = (12, 12, 52, 52)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=color)
    image.save(path)


def write_data(root) -> None:
    """Two tasks with PNG images: colour (LLaVA train, CoIN test), shape (CoIN .jsonl train, LLaVA test).

    Each task has one answer ("red", "circle"): six steps learn it, so the scores that eval must
    reproduce are not all zero.
    """
    images = root / "images"
    images.mkdir(parents=True)
    samples = [(c, s, f"images/{c}_{s}.png") for c in COLORS for s in SHAPES]
    for color, shape, name in samples:
        draw(root / name, color, shape)

    def llava(question, answer, image, index):
        turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        return {"id": f"q{index}", "image": image, "conversations": turns}

    def coin(question, answer, image, index):
        return {"question_id": index, "image": image, "text": question, "answer": answer}

    color_q, shape_q = "what color is the shape?", "what shape is in the image?"
    (root / "color_train.json").write_text(
        json.dumps([llava(color_q, "red", img, i) for i, (_, _, img) in enumerate(samples)])
    )
    (root / "color_test.json").write_text(
        json.dumps([coin(color_q, "red", img, i) for i, (_, _, img) in enumerate(samples[:4])])
    )
    lines = [json.dumps(coin(shape_q, "circle", img, i)) for i, (_, _, img) in enumerate(samples)]
    (root / "shape_train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "shape_test.json").write_text(
        json.dumps([llava(shape_q, "circle", img, i) for i, (_, _, img) in enumerate(samples[:4])])
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny LLaVA on disk, two tasks of data, and a run file that uses them (relative paths)."""
    root = tmp_path_factory.mktemp("cli")
    model, processor = build_tiny_llava(seed=0)
    model.save_pretrained(root / "tiny_llava")
    processor.save_pretrained(root / "tiny_llava")
    write_data(root / "data")
    run = RUN_HEAD + TRAINING + RUN_TASKS
    (root / "run.yaml").write_text(run)
    return root


@pytest.fixture(scope="module")
def trained(run_dir):
    """`cmoe train` on the run file: two tasks, two steps each."""
    assert cli.main(["train", str(run_dir / "run.yaml")]) == 0
    return run_dir


# -- validation ------------------------------------------------------------------------------------


def problems(path, purpose: str = "train") -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_run_config(str(path), purpose)
    return error.value.problems


def test_every_problem_is_reported_at_once_with_its_place(run_dir, tmp_path):
    (tmp_path / "data").mkdir()
    path = write_yaml(
        tmp_path,
        f"""
        model: {run_dir / "tiny_llava"}
        dtype: bfloat17
        modle_class: auto
        adapter:
          preset: llava_cmoe
          num_expert: 4
          r: eight
        training:
          output_dir: out
          learning_rate: fast
          num_train_epoch: 1
          lr_scheduler_type: cosin
        tasks:
          - {{name: color, train: {run_dir / "data/color_train.json"}}}
          - {{name: color, train: {run_dir / "data/shape_train.jsonl"}}}
          - {{name: "bad name", train: data/missing.json, eval_format: csv}}
          - {{train: {run_dir / "data/color_train.json"}}}
        """,
    )
    found = problems(path)
    expected = [
        "modle_class (line 4): unknown key (did you mean model_class?)",
        "dtype (line 3): expected one of 'auto', 'float32', 'float16', 'bfloat16', got 'bfloat17' "
        "(did you mean 'bfloat16'?)",
        "adapter.num_expert (line 7): unknown key (did you mean num_experts?)",
        "adapter.r (line 8): expected an integer, got 'eight'",
        "training.learning_rate (line 11): expected a number, got 'fast'",
        "training.num_train_epoch (line 12): unknown key (did you mean num_train_epochs?)",
        "training.lr_scheduler_type (line 13): expected one of",
        "tasks[1].name (line 16): duplicate task name 'color' (also tasks[0])",
        "tasks[2].name (line 17): Task name 'bad name' cannot be used",
        f"tasks[2].train (line 17): file not found: {tmp_path / 'data' / 'missing.json'}",
        "tasks[2].eval_format (line 17): expected one of 'auto', 'llava', 'coin', got 'csv'",
        "tasks[3].name (line 18): missing required key",
    ]
    assert len(found) == len(expected), "\n".join(found)
    for message, start in zip(found, expected, strict=True):
        assert message.startswith(start), (message, start)
    assert "did you mean 'cosine'?" in found[6]


def test_a_task_names_its_benchmark_metric_and_a_wrong_one_is_reported(run_dir, tmp_path):
    path = write_yaml(
        tmp_path,
        f"""
        model: {run_dir / "tiny_llava"}
        training: {{output_dir: out}}
        tasks:
          - {{name: text, train: {run_dir / "data/color_train.json"}, metric: vqa}}
          - {{name: grounding, train: {run_dir / "data/color_train.json"}, metric: grounding_io}}
        """,
    )
    (message,) = problems(path)
    assert message.startswith("tasks[1].metric (line 6): expected one of") and "'grounding_iou'?" in message
    path.write_text(path.read_text().replace("grounding_io}", "grounding_iou}"))
    config = load_run_config(str(path))
    assert [task.metric for task in config.tasks] == ["vqa", "grounding_iou"]


def test_the_config_s_own_rules_and_required_keys(tmp_path):
    (tmp_path / "model").mkdir()
    path = write_yaml(
        tmp_path,
        """
        model: ./model
        adapter: {top_k: 3, num_experts: 2, task_records: [], locator_temperature: 0}
        training: {learning_rate: 2e-4}
        tasks:
          - {name: a}
        """,
    )
    found = problems(path)
    assert found[0].startswith("model (line 2): not a model directory (no config.json)")
    assert (
        found[1]
        == "adapter.task_records (line 3): is written by training (the adapter's state); leave it out"
    )
    assert "training.output_dir (line 4): missing required key" in found[2]
    assert found[3] == "tasks[0].train (line 6): missing required key (the task's training data file)"
    assert len(found) == 4

    path.write_text("model: m\nadapter: {top_k: 3, num_experts: 2, locator_temperature: 0}\ntasks: []\n")
    found = problems(path, "eval")
    assert found[0].startswith("adapter.top_k (line 2): top_k=3 exceeds num_experts=2")
    assert found[1].startswith("adapter.locator_temperature (line 2): locator_temperature=0: must be > 0")
    assert found[2].startswith("tasks (line 3): expected a non-empty list")


def test_duplicate_keys_and_fields_the_trainer_decides(tmp_path):
    path = write_yaml(
        tmp_path,
        "model: a/b\nmodel: c/d\n"
        "training: {eval_strategy: steps, resume_from_checkpoint: x}\ntasks: [{name: a}]\n",
    )
    assert problems(path, "eval") == [
        "model (line 2): duplicate key (YAML would silently keep only this last value)",
        "training.eval_strategy (line 3): the continual trainer evaluates every seen task after each task "
        "by itself; leave it out",
        "training.resume_from_checkpoint (line 3): use `cmoe train RUN.yaml --resume` instead",
    ]


def test_values_are_typed_and_paths_resolved_against_the_run_file(run_dir, tmp_path):
    config = load_run_config(str(run_dir / "run.yaml"))
    assert config.model == str(run_dir / "tiny_llava") and config.model_is_local
    assert config.training["learning_rate"] == 3e-2  # YAML reads "3e-2" as a string
    assert config.training["output_dir"] == str(run_dir / "out")
    assert [t.name for t in config.tasks] == ["color", "shape"]
    assert config.tasks[1].train == str(run_dir / "data" / "shape_train.jsonl")
    assert config.tasks[0].image_root == str(run_dir / "data")
    assert config.adapter_config().num_experts == 2

    path = write_yaml(
        tmp_path, "model: llava-hf/llava-1.5-7b-hf\nadapter: {preset: cl_moe}\ntasks: [{name: a}]\n"
    )
    config = load_run_config(str(path), "eval")  # evaluation needs neither train files nor output_dir
    assert not config.model_is_local and config.adapter_config().momentum_merge
    path.write_text("model: [1]\nfoo: 1\n")
    found = problems(path)
    known = "model, model_class, model_revision, dtype, trust_remote_code, data_root, image_root, max_length"
    known += ", adapter"
    assert found[0] == f"foo (line 2): unknown key (known: {known}, training, tasks)"
    assert found[1] == "model (line 1): expected a Hub id or a directory, got [1]"


def test_bad_yaml_and_a_missing_file_exit_2_without_traceback(tmp_path, capsys):
    path = write_yaml(tmp_path, "model: x\ntasks: [\n")
    assert cli.main(["train", str(path)]) == 2
    error = capsys.readouterr().err
    assert "not valid YAML" in error and "line 3" in error and "Traceback" not in error
    assert cli.main(["train", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "nope.yaml: 1 problem, nothing was loaded:\n  - file not found" in capsys.readouterr().err
    assert cli.main(["train"]) == 2  # argparse usage error
    assert "RUN.yaml" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_loads_nothing(run_dir, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a dry run must not load a model")

    monkeypatch.setattr(cli, "load_base_model", no_loading)
    text = (run_dir / "run.yaml").read_text().replace("output_dir: out", f"output_dir: {tmp_path / 'dry'}")
    path = run_dir / "dry.yaml"
    path.write_text(text.replace("use_cpu: true", "bf16: true"))
    assert cli.main(["train", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr()
    assert "1. color" in printed.out and "train 8 llava records" in printed.out
    assert "eval 4 llava records" in printed.out  # shape's test file, auto-detected
    assert "no model was loaded" in printed.out
    assert (
        "locator   locator_feature_source=first_layer_input, locator_pooling=text_image_moments"
        in printed.out
    )
    assert "locator_open_set=base, locator_open_set_fence=10.0" in printed.out
    if "bf16" in printed.err:  # a machine without bf16: a warning in a dry run, an error for real
        assert cli.main(["train", str(path)]) == 2
        assert "bf16" in capsys.readouterr().err
    assert not (tmp_path / "dry").exists()


def test_a_bad_data_file_is_found_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x", "image": "gone.png", "conversations": []}]))
    path = write_yaml(
        tmp_path,
        f"model: {run_dir / 'tiny_llava'}\ntraining: {{output_dir: out}}\n"
        "tasks: [{name: a, train: bad.json}]\n",
    )
    assert cli.main(["train", str(path)]) == 2
    assert "bad.json: record 0 (x): every turn needs 'from'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps([{"q": 1}]))
    assert cli.main(["train", str(path)]) == 2
    assert "neither LLaVA ('conversations') nor CoIN" in capsys.readouterr().err


def test_a_missing_adapter_is_found_before_the_model_loads(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    missing = str(run_dir / "no_such_adapter")
    assert cli.main(["eval", str(run_dir / "run.yaml"), "--adapter", missing]) == 2
    assert f"the adapter directory {missing} does not exist" in capsys.readouterr().err
    assert (
        cli.main(["locate", "--adapter", missing, "--data", str(run_dir / "data" / "color_test.json")]) == 2
    )


# -- the commands on a tiny model ------------------------------------------------------------------


def test_train_saves_every_task_and_refuses_to_overwrite_them(trained, capsys):
    out = trained / "out"
    for task in ("color", "shape"):
        assert (out / task / "adapter_config.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["color", "shape"]
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    assert results["summary"]["locator_accuracy"] is not None
    assert [len(row) for row in results["locator_confusion"]] == [3, 3]  # color, shape, none
    assert results["summary"]["open_set_rate"] is not None
    assert "| task \\ located to | color | shape | none (base model) |" in (out / "results.md").read_text()

    capsys.readouterr()
    assert cli.main(["train", str(trained / "run.yaml")]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(["train", str(trained / "run.yaml"), "--resume"]) == 0  # everything is restored
    assert "| shape |" in capsys.readouterr().out


def test_eval_scores_every_task_the_adapter_knows(trained, tmp_path, capsys):
    report_path = tmp_path / "scores.json"
    argv = ["eval", str(trained / "run.yaml"), "--adapter", str(trained / "out" / "color")]
    assert cli.main([*argv, "--oracle", "--output", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "skipped shape: the adapter has not learnt it" in printed
    report = json.loads(report_path.read_text())
    assert report["tasks"] == ["color"] and report["locator_accuracy"] == 1.0  # one task: always right
    matrix = json.loads((trained / "out" / "results.json").read_text())["accuracy_matrix"]
    assert report["accuracy"] == report["oracle_accuracy"] == pytest.approx(matrix[0])

    argv[-1] = str(trained / "out" / "shape")
    assert cli.main([*argv, "--output", str(report_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["tasks"] == ["color", "shape"] and report["oracle_accuracy"] is None
    assert sum(map(sum, report["locator_confusion"]["counts"])) == 8
    assert report["locator_confusion"]["columns"] == ["color", "shape", None]  # None: in no task
    none = [row[-1] for row in report["locator_confusion"]["counts"]]
    assert report["open_set_rate"] == sum(none) / 8 and report["open_set_rate_per_task"] == [
        n / 4 for n in none
    ]
    assert report["accuracy"] == pytest.approx(matrix[1])  # the trainer's scores, from the saved adapter
    assert printed.splitlines()[1].split() == ["task", "metric", "located", "locator", "none"]
    assert printed.splitlines()[2].split()[:2] == ["color", "exact_match"]
    assert "locator accuracy:" in printed
    confusion = printed[printed.index("locator confusion") :].splitlines()
    assert confusion[1].split()[:4] == ["true", "task", "records", "color"]
    assert confusion[2].split()[:2] == ["color", "4"] and confusion[4].split()[:2] == ["all", "8"]
    assert f"open-set rate: {100 * report['open_set_rate']:.1f}% of the learnt tasks' records" in printed


def test_locate_prints_json_lines_or_a_summary(trained, capsys):
    adapter = str(trained / "out" / "shape")
    data = str(trained / "data" / "shape_test.json")  # images relative to the data file's directory
    assert cli.main(["locate", "--adapter", adapter, "--data", data, "--probabilities"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3] and lines[0]["id"] == "q0"
    for line in lines:
        assert set(line["probabilities"]) == {"color", "shape"}
        nearest = max(line["probabilities"], key=line["probabilities"].get)
        assert line["task"] == (None if line["unknown"] else nearest)
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert isinstance(line["novelty"], float)
    model = str(trained / "tiny_llava")
    assert cli.main(["locate", "--adapter", adapter, "--model", model, "--data", data, "--summary"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"4 records of {data}") and "  color: " in printed and "  shape: " in printed
    assert "  none (base model): " in printed, "the none count shows without true tasks too"
    assert "locator confusion" not in printed  # no --task: nothing to compare against


def foreign_questions(trained):
    """Records of a question no task was trained on (the same images): no learnt task should take them."""
    path = trained / "data" / "describe_test.json"
    images = [f"images/{color}_circle.png" for color in COLORS]
    question = "describe the image in detail please"
    path.write_text(
        json.dumps(
            [
                {"question_id": i, "image": image, "text": question, "answer": "a shape"}
                for i, image in enumerate(images)
            ]
        )
    )
    return str(path)


def test_locate_puts_records_of_no_learnt_task_in_the_none_column(trained, tmp_path, capsys):
    adapter = str(trained / "out" / "shape")
    color, shape = str(trained / "data" / "color_test.json"), str(trained / "data" / "shape_test.json")
    foreign = foreign_questions(trained)
    files = ["--data", color, "--data", foreign, "--data", shape]  # one batch holds all three kinds

    assert cli.main(["locate", "--adapter", adapter, *files]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["data"] for line in lines] == [color] * 4 + [foreign] * 4 + [shape] * 4
    assert [line["task"] for line in lines] == ["color"] * 4 + [None] * 4 + ["shape"] * 4
    assert [line["unknown"] for line in lines] == [False] * 4 + [True] * 4 + [False] * 4
    known = [line["novelty"] for line in lines if line["task"] is not None]
    assert min(line["novelty"] for line in lines[4:8]) > max(known), "unknown = the most novel"

    report_path = tmp_path / "located.json"
    tasks = ["--task", "color", "--task", "describe", "--task", "shape"]
    argv = ["locate", "--adapter", adapter, *files, *tasks, "--summary", "--output", str(report_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "  none (base model): 4 (33.3%)" in printed
    table = printed[
        printed.index("locator confusion in % of each true task's records (columns: located to):") + 1 :
    ]
    assert table[0].split() == [
        "true",
        "task",
        "records",
        "color",
        "shape",
        "none",
        "(base",
        "model)",
        "correct",
    ]
    assert table[1].split() == ["color", "4", "100.0", "0.0", "0.0", "100.0"]
    assert table[2].split() == ["describe*", "4", "0.0", "0.0", "100.0", "100.0"]  # not learnt: none is right
    assert table[3].split() == ["shape", "4", "0.0", "100.0", "0.0", "100.0"]
    assert table[4].split() == ["all", "12", "33.3", "33.3", "33.3", "100.0"]
    assert "locator accuracy: 100.0% (records of learnt tasks)" in printed
    assert any(line.startswith("open-set rate: 0.0% of the learnt tasks' records") for line in printed)
    report = json.loads(report_path.read_text())
    assert report["located"] == {"color": 4, "shape": 4} and report["none"] == report["unknown"] == 4
    assert report["locator_confusion"] == {
        "tasks": ["color", "shape"],
        "columns": ["color", "shape", None],
        "counts": [[4, 0, 0], [0, 4, 0]],
    }
    assert report["locator_accuracy_per_task"] == {"color": 1.0, "shape": 1.0}
    describe = report["not_learnt"]["describe"]
    assert report["open_set_rate"] == 0.0 and list(report["not_learnt"]) == ["describe"]
    assert describe["records"] == 4 and describe["located_none"] == 1.0
    # every describe record is more novel than every learnt one (see the JSON lines above)
    assert describe["auroc"] == 1.0 and describe["flagged_at_suggested_fence"] == 1.0
    # keeps 99% of 8 learnt records: all of them (the JSON lines round novelty to 4 decimals)
    assert describe["suggested_fence"] == pytest.approx(max(0.0, max(known)), abs=1e-4)
    check = printed.index("describe* (not learnt): novelty AUROC 1.000 against the learnt tasks' records")
    assert (
        printed[check + 1].startswith("  100.0% beyond fence")
        and "(locator_open_set_fence: 10)" in printed[check + 1]
    )

    assert cli.main(["locate", "--adapter", adapter, *files, "--task", "color"]) == 2
    assert "3 --data but 1 --task" in capsys.readouterr().err


def test_push_tags_every_task_and_retries_pending_ones(trained, hub_server, capsys):
    out = str(trained / "out")
    repo = "tester/cli-run"
    argv = ["push", out, "--hub-model-id", repo, "--token", hub_server.token, "--private"]
    hub_server.fail_next(n=1, path_contains="/commit/", status=422)
    assert cli.main(argv) == 1
    assert read_pending(out) == ["color", "shape"]
    assert "still pending" in capsys.readouterr().err

    assert cli.main([*argv, "--pending"]) == 0
    hosted = hub_server.repo(repo)
    assert hosted.private and set(hosted.tags) == {"color", "shape"}
    assert hosted.tags["shape"] == hosted.branches["main"]
    assert (
        hosted.files("color")["adapter_config.json"]
        == (trained / "out/color/adapter_config.json").read_bytes()
    )
    assert not (trained / "out" / PENDING_FILE).exists()
    assert cli.main([*argv, "--pending"]) == 0 and "nothing is pending" in capsys.readouterr().out

    # pushing everything again: main stays on the latest task
    write_pending(out, [])
    assert cli.main(argv) == 0
    hosted = hub_server.repo(repo)
    assert hosted.tags["shape"] == hosted.branches["main"] and set(hosted.branches) == {"main"}
    assert cli.main(["push", str(trained / "data"), "--hub-model-id", repo]) == 2


def test_demo_gets_its_arguments_untouched(monkeypatch):
    from cmoe_adapters import demo

    seen = []
    monkeypatch.setattr(demo, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["demo", "--steps", "3", "--help", "train"]) == 0
    assert seen == [["--steps", "3", "--help", "train"]]


def test_python_dash_m_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cmoe", "push", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("cmoe_adapters", run_name="__main__")
    assert exit_info.value.code == 0 and "--hub-model-id" in capsys.readouterr().out
