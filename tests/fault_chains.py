"""The fault chains of tests/test_faults*.py: a stream killed by SIGKILL at moment after moment.

Each chain runs the three-task stream of ``scripts/continual_stream.py`` in a fresh process with
``--resume`` until it finishes, and the process is killed at the next moment of its fault list
each time (see ``scripts/fault_points.py``): several moments per phase, many kills per stream, two
in one task. The adapters (every expert, router, usage statistic and locator) and the accuracy
matrix it ends with must equal an uninterrupted run's exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel

from cmoe_adapters.results import ContinualResult

if TYPE_CHECKING:  # importing it here would keep pytest from registering it as a plugin
    from hub_server import FakeHub

SCRIPT = Path(__file__).parent / "scripts" / "continual_stream.py"
TIMEOUT_S = 600
HUB_REPO = "tester/faulty-stream"

CHAINS = {
    # LLaVA-CMoE: a probe phase before each later task (its own training steps and expert choice)
    "llava_cmoe": [
        "add:low",  # the first task's experts exist, nothing is saved yet: the task restarts
        "locator:low",  # trained, its locator being fitted, nothing saved
        "probe:mid:2",  # in the probe phase
        "train:mid:12",  # after a checkpoint
        "checkpoint:mid:16",  # while a checkpoint is written: the one before it is resumed
        "staged:mid",  # the same task killed twice, the second time in its save
        "eval:high:3",  # in the last task's evaluation, after two of its three tasks
    ],
    # CL-MoE: the momentum merge and the task gate's usage statistics at every task's end
    "cl_moe": [
        "saved:low",  # the task's folder is in place, results.json does not name it yet
        "eval:mid:2",  # after the merge, before the task is saved
        "push:mid",  # its commit is on the Hub, its tag is not
        "checkpoint:high:8",  # the task's first checkpoint cut short: the task restarts
    ],
}


def run_stream(
    output_dir: Path, preset: str, *options: str, hub: FakeHub | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    if hub is not None:  # the process pushes every task to the fake Hub this test serves
        home = output_dir.parent / "hf_home"
        env.update(
            HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token, HF_HOME=str(home),
            HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
        )  # fmt: skip
        options = (*options, "--hub-model-id", HUB_REPO)
    command = [sys.executable, str(SCRIPT), str(output_dir), "--preset", preset, *options]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def finished_dump(folder: Path) -> dict:
    return torch.load(folder / "rank0.pt")


def uninterrupted_dump(preset: str, folder: Path) -> dict:
    """The dump of the stream run once without a fault."""
    finished = run_stream(folder / "out", preset, "--dump", str(folder / "dump"))
    assert finished.returncode == 0, finished.stderr[-6000:]
    return finished_dump(folder / "dump")


def kill_and_resume_until_done(preset: str, tmp_path: Path, hub: FakeHub | None = None) -> None:
    """Run the preset's chain: kill at each moment, resume, and compare with an uninterrupted run.

    With `hub`, every task is pushed to it, and each revision must be the task's local save.
    """
    reference = uninterrupted_dump(preset, tmp_path / "uninterrupted")
    faults = CHAINS[preset]
    output_dir = tmp_path / "out"
    kills = 0
    while True:
        options = ["--resume", "--faults", ",".join(faults), "--dump", str(tmp_path / "dump")]
        finished = run_stream(output_dir, preset, *options, hub=hub)
        if finished.returncode == 0:
            break
        assert finished.returncode == -9, f"run {kills + 1} failed:\n{finished.stderr[-6000:]}"
        kills += 1
        assert kills <= len(faults), "a fault fired twice"
    fired = (output_dir / "faults_fired").read_text().split()
    assert fired == faults and kills == len(faults), "every fault killed exactly one run, in order"

    resumed = finished_dump(tmp_path / "dump")
    assert resumed["matrix"] == reference["matrix"]
    assert resumed["state"].keys() == reference["state"].keys()
    different = [
        key for key, value in reference["state"].items() if not torch.equal(value, resumed["state"][key])
    ]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert ContinualResult.load(str(output_dir)).tasks == ["low", "mid", "high"]
    leftovers = [name for name in os.listdir(output_dir) if name.endswith((".saving", ".old"))]
    assert not leftovers, f"an interrupted save left {leftovers} behind"
    if hub is not None:  # every task's revision on the Hub is its local save, main the last one
        from conftest import tiny_llama

        for revision, folder in [("low", "low"), ("mid", "mid"), ("high", "high"), ("main", "high")]:
            pulled = PeftModel.from_pretrained(tiny_llama(), HUB_REPO, revision=revision, token=hub.token)
            local = PeftModel.from_pretrained(tiny_llama(), output_dir / folder)
            for (key, value), (_, expected) in zip(
                pulled.state_dict().items(), local.state_dict().items(), strict=True
            ):
                assert torch.equal(value, expected), (revision, key)
        assert not (output_dir / "hub_pending.json").exists(), "nothing is left to push"
