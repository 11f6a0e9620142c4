"""`accelerate launch` of a plain loop over the model's task lifecycle, on two CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_runs import free_port

pytestmark = pytest.mark.multiprocess  # several processes: the newest dependency set only in CI

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "plain_loop_accelerate.py"


def test_accelerate_launch_runs_the_lifecycle_on_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path),
    ]  # fmt: skip
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert finished.returncode == 0, finished.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["state"].keys() == rank1["state"].keys()
    for key, value in rank0["state"].items():  # DDP kept the ranks in step; locators fitted alike
        assert torch.equal(value, rank1["state"][key]), key
    assert rank0["fitted"] == {"low": 64, "mid": 64}, "each locator saw both processes' 32 features"
    assert rank0["located"] == rank1["located"] == ["mid"] * 4
