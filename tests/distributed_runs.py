"""Two CPU processes (gloo) through the synthetic stream: what tests/test_distributed.py and
tests/test_zero3_methods.py share (``torchrun`` of `scripts/continual_stream.py`, dumps, checks)."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "continual_stream.py"
TIMEOUT_S = 600  # a hang (e.g. a rank waiting for a gradient another rank never makes) fails the test

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (the test extra installs it: pip install -e '.[test]')",
)

# what a rank other than 0 may write: the Trainer's own per-rank RNG state and, under DeepSpeed,
# the engine's own partitions of the checkpoint (and the folders holding them)
RANK_1_OWN_FILES = re.compile(
    r".*/checkpoints(/\w+(/checkpoint-\d+(/rng_state_1\.pth"
    r"|/global_step\d+(/zero_pp_rank_1_mp_rank_00_(model|optim)_states\.pt)?)?)?)?$"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(script: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(script), *arguments,
    ]  # fmt: skip
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def run_stream(folder: Path, *options: str) -> tuple[dict, dict]:
    """Train the stream on two processes into ``folder/out``; returns both ranks' dumps."""
    finished = torchrun(SCRIPT, str(folder / "out"), "--ddp", "--dump", str(folder / "dump"), *options)
    assert finished.returncode == 0, f"{options}:\n{finished.stdout[-3000:]}\n{finished.stderr[-6000:]}"
    return load_dumps(folder / "dump")


def load_dumps(dump: Path) -> tuple[dict, dict]:
    return torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")


def assert_ranks_identical(rank0: dict, rank1: dict, locator: bool = True) -> None:
    assert rank0["state"].keys() == rank1["state"].keys()
    assert any("locator" in key for key in rank0["state"]) == locator
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key


def assert_saved_adapter_is(folder: Path, state: dict) -> None:
    """The adapter saved after the last task loads in a plain process with exactly `state`."""
    reloaded = PeftModel.from_pretrained(tiny_llama(), folder)
    loaded = {key: value for key, value in reloaded.state_dict().items() if "cmoe_" in key or "lora_" in key}
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def zero_arguments(stage: int) -> list[str]:
    """ZeRO-3 also runs with activation checkpointing, which the trainer makes reentrant there."""
    return ["--zero-stage", str(stage), *(["--checkpointing"] if stage == 3 else [])]
