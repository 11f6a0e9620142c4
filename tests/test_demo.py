"""`cmoe demo`: option errors, the whole demo on a tiny budget (``--fast``, every CI run), the shipped
base, and (slow) the real demo's claims and a re-run of the base's pretraining."""

from __future__ import annotations

import configparser
import fnmatch
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cmoe_adapters import cli, demo
from cmoe_adapters.easyvqa import build_tiny_llava
from cmoe_adapters.easyvqa import pretrain as base_pretraining
from cmoe_adapters.easyvqa.pretrain import (
    METRICS_FILE,
    SHIPPED_BASE,
    cached_base_path,
    capture_projected_image_tokens,
    evaluate_base,
    shipped_base,
)

REPO = Path(__file__).resolve().parents[1]
ACCURACIES = ("color", "shape", "matching")


def test_bad_options_are_all_reported_with_exit_code_2(capsys):
    code = demo.main(["--tasks", "1", "--steps", "0", "--learning-rate", "-1"])
    error = capsys.readouterr().err
    assert code == 2
    assert "--tasks" in error and "--steps" in error and "--learning-rate" in error


def test_unknown_preset_is_refused_by_the_parser():
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--preset", "lwf"])
    assert exit_info.value.code == 2


def test_fast_flags_are_defaults_under_the_flags_given():
    options = demo.options_from(demo.build_parser().parse_args(["--fast", "--steps", "2"]))
    assert options.fast and options.steps == 2
    assert options.tasks == demo.FAST_OVERRIDES["tasks"]
    assert demo.options_from(demo.build_parser().parse_args([])) == demo.DemoOptions()
    assert any("--pretrain-base" in problem for problem in demo.fast_options(pretrain_base=True).problems())


def test_a_stream_keeps_the_cores_of_a_finished_one_only_if_its_steps_get_faster():
    shared = demo.SharedProgress(steps=None, finished=SimpleNamespace(value=1), runs=2, cores=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        idle = demo._ReportSteps(shared)
        for seconds in [1.0] * 5 + [0.6] * 5:  # two threads pay on idle cores
            idle.record_step(seconds)
        assert torch.get_num_threads() == 2 and not idle.settled

        torch.set_num_threads(1)
        busy = demo._ReportSteps(shared)
        for seconds in [1.0] * 5 + [3.0] * 5 + [1.0] * 10:  # on busy cores they wait for each other
            busy.record_step(seconds)
        assert torch.get_num_threads() == 1 and busy.settled

        torch.set_num_threads(1)
        short = demo._ReportSteps(shared)
        for seconds in [1.0] * 7:  # a trial the task's end cuts short is undone
            short.record_step(seconds)
        short.on_train_end(None, None, None)
        assert torch.get_num_threads() == 1 and short.recent == []
    finally:
        torch.set_num_threads(threads)


def test_fast_demo_runs_every_step_of_the_real_one(tmp_path, monkeypatch, capsys):
    """``cmoe demo --fast`` through the CLI, nothing replaced: base pretraining (a few steps), both
    streams in their own processes, the report. Whatever breaks the demo's path breaks this."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CMOE_ADAPTERS_CACHE", str(cache))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--fast", "--output-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "sequential LoRA" in printed and "continual MoE" in printed and "locator accuracy" in printed
    assert demo.FAST_NOTE in printed
    assert not cache.exists()  # the throw-away base never goes where a real one is looked for

    report = json.loads((out / "results.json").read_text())
    assert report["options"]["fast"] and report["note"] == demo.FAST_NOTE
    base = report["base"]
    assert base["source"] == "fast"
    assert base["metrics"]["schedule"]["name"] == "fast"
    assert all(0.0 <= base["metrics"][name] <= 1.0 for name in ACCURACIES)
    assert set(report["runs"]) == {"sequential LoRA", "continual MoE"}
    for run in report["runs"].values():
        assert [len(row) for row in run["accuracy_matrix"]] == [1, 2]
        assert all(0.0 <= value <= 1.0 for row in run["accuracy_matrix"] for value in row)
        assert run["seconds"] > 0 and run["adapter_parameters"] > 0 and run["startup_seconds"] >= 0
    moe, lora = report["runs"]["continual MoE"], report["runs"]["sequential LoRA"]
    assert moe["summary"]["locator_accuracy"] is not None
    assert lora["summary"]["locator_accuracy"] is None
    # frozen experts + per-task routers: the first task's score after the second equals its own
    # whenever the locator sends every question of it to its own task
    if moe["locator_confusion"][0][0] == sum(moe["locator_confusion"][0]):
        assert moe["accuracy_matrix"][1][0] == moe["accuracy_matrix"][0][0]
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# cmoe demo") and demo.FAST_NOTE in markdown
    assert (out / "results.png").stat().st_size > 0
    for run in ("sequential-lora", "continual-moe"):
        for task in ("shape", "color"):
            assert (out / run / task / "adapter_config.json").is_file()


def test_pretrain_base_loads_the_cached_one_from_the_cache_dir(tmp_path, capsys):
    # a cache hit: an (untrained) base where --pretrain-base looks; the streams run in this process
    cache = tmp_path / "cache"
    model, processor = build_tiny_llava(seed=0)
    base_dir = cached_base_path(cache, seed=0)
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    (base_dir / METRICS_FILE).write_text('{"note": "untrained"}')
    out = tmp_path / "demo"
    argv = ["--tasks", "2", "--steps", "2", "--train-questions", "64", "--test-questions", "16"]
    flags = ["--pretrain-base", "--cache-dir", str(cache), "--sequential", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on cores other programs keep busy, two threads are many times slower
    try:
        assert demo.main([*argv, *flags, "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "loaded from the cache" in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert report["base"]["source"] == "pretrained"
    assert report["base"]["metrics"] == {"note": "untrained"}
    for run in report["runs"].values():
        assert [len(row) for row in run["accuracy_matrix"]] == [1, 2]


def test_the_shipped_base_is_really_pretrained(tmp_path, monkeypatch):
    """Held-out colour, shape and matching far above chance (1/8, 1/3, 1/2), read from the package
    alone (an empty cache), and a record of how it was made."""
    monkeypatch.setenv("CMOE_ADAPTERS_CACHE", str(tmp_path / "cache"))
    model, processor = shipped_base()
    _, held_out = base_pretraining._split_images(base_pretraining.SHIPPED_SEED)
    accuracy = evaluate_base(model, processor, held_out[:100])
    assert all(accuracy[name] >= 0.85 for name in ACCURACIES), accuracy
    assert not (tmp_path / "cache").exists()

    record = json.loads((SHIPPED_BASE / METRICS_FILE).read_text())
    assert record["made_by"] == "cmoe_adapters.easyvqa.pretrain.pretrain(seed=0)"
    assert record["seed"] == 0 and record["held_out_images"] == base_pretraining.HELD_OUT_IMAGES
    schedule = record["schedule"]
    assert (schedule["vision_steps"], schedule["mixed_steps"]) == (
        base_pretraining.VISION_STEPS,
        base_pretraining.MIXED_STEPS,
    )
    assert {"torch", "transformers"} <= set(record["versions"])
    assert all(record[name] >= 0.85 for name in ACCURACIES)


def test_the_shipped_base_is_package_data():
    """Every file of the shipped base matches a pattern of setup.cfg's package data (or a wheel
    would ship a demo without its base)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = config["options.package_data"]["cmoe_adapters.easyvqa"].split()
    files = [p.relative_to(SHIPPED_BASE.parent).as_posix() for p in SHIPPED_BASE.iterdir()]
    assert METRICS_FILE in {Path(f).name for f in files} and "base/model.safetensors" in files
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), (files, patterns)


def test_the_projector_hook_captures_the_projected_image_tokens():
    """What the hook captures is the projector applied to the vision tower's last layer without
    CLS (the config's feature layer and strategy), for every image of the batch."""
    from cmoe_adapters.easyvqa.pretrain import _pixels

    model, processor = build_tiny_llava(seed=0)
    pixels = _pixels(processor, [0, 1, 2])
    with torch.no_grad(), capture_projected_image_tokens(model) as captured:
        model.get_image_features(pixel_values=pixels)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        expected = model.model.multi_modal_projector(hidden[:, 1:])
    assert len(captured) == 2  # the model's call, then ours
    assert captured[0].shape == (3, 16, model.config.text_config.hidden_size)
    assert torch.equal(captured[0], expected)
    model.get_image_features(pixel_values=pixels)
    assert len(captured) == 2  # the hook is gone after the block


@pytest.mark.slow
def test_the_real_demo_shows_forgetting_and_keeps_the_continual_moe_from_it(tmp_path):
    """The issue's claim, with the demo's defaults: BWT of sequential LoRA far below, MoE >= -2 pts."""
    assert demo.main(["--output-dir", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["base"]["source"] == "shipped"
    lora = report["runs"]["sequential LoRA"]["summary"]
    moe = report["runs"]["continual MoE"]["summary"]
    assert lora["bwt"] < -0.3
    assert moe["bwt"] >= -0.02
    assert moe["locator_accuracy"] >= 0.98
    assert moe["final_average"] > lora["final_average"] + 0.3


@pytest.mark.slow
def test_pretraining_again_gives_a_base_as_good_as_the_shipped_one():
    """`pretrain(seed=0)` here (~2.5-4 min): every held-out accuracy at least 0.85 and within 8
    points of the shipped base's record. Identical weights are not asserted: they are (checked with
    the shipped base's versions and thread count), but the random init differs between transformers
    releases and float rounding between thread counts (5.24 with 1 and 2 threads: matching 0.96 and
    0.91 against the shipped 0.97)."""
    shipped = json.loads((SHIPPED_BASE / METRICS_FILE).read_text())
    _, _, metrics = base_pretraining.pretrain(seed=0, progress=False)
    for name in ACCURACIES:
        assert metrics[name] >= max(0.85, shipped[name] - 0.08), (name, metrics[name], shipped[name])


def test_pretraining_collator_with_processed_pixels_matches_the_processor():
    """Stage 2 of the base pretraining feeds cached pixels; the batch must be the processor's."""
    from cmoe_adapters.easyvqa.collate import VQACollator
    from cmoe_adapters.easyvqa.pretrain import _caption_record, _match_record, _pixels

    _, processor = build_tiny_llava()
    ids = [0, 1, 2]
    records = [_caption_record(0), _match_record(1, random.Random(0)), _caption_record(2)]
    collator = VQACollator(processor)
    reference = collator(records)
    cached = collator([{**r, "image": None} for r in records], pixel_values=_pixels(processor, ids))
    assert reference.keys() == cached.keys()
    for key, value in reference.items():
        assert torch.equal(value, cached[key]), key
