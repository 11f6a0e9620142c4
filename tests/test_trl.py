"""TRL's `SFTTrainer` runs the published methods end to end through the model's task lifecycle.

A real VLM processor (the demo's `LlavaProcessor`), TRL's own vision-language collator, easy-vqa
records in TRL's prompt-completion format; `examples/trl_sft_continual.py` run as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[test,trl]' (CI: newest set)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "trl_sft_continual.py")


@pytest.mark.parametrize("preset", ["llava_cmoe", "cl_moe"])
def test_sft_trainer_runs_the_method_end_to_end(preset, tmp_path):
    out = tmp_path / preset
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, SCRIPT, "--preset", preset, "--steps", "20", "--train", "160", "--test", "30",
               "--output-dir", str(out)]  # fmt: skip
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    matrix = results["accuracy_matrix"]
    assert results["tasks"] == ["shape", "color"] and [len(row) for row in matrix] == [1, 2]
    for task in results["tasks"]:  # one loadable adapter per task, as ContinualMoETrainer writes
        assert (out / task / "adapter_config.json").is_file() and (
            out / task / "adapter_model.safetensors"
        ).is_file()
    logs = results["task_logs"]
    assert all(log["router_aux_loss"] for log in logs), "TRL's loss carried the balancing loss"
    assert all("locator" in log for log in logs)
    if preset == "llava_cmoe":
        assert "expansion" in logs[1], "the second task was probed"
        assert matrix[1][0] == matrix[0][0], "frozen experts and a located task: the first task is kept"
    else:
        assert "momentum" in logs[1], "CL-MoE's momentum merge ran"
    # the second task was learnt: 8 colours, chance 0.125 (CL-MoE's merge then keeps 70% of the
    # old weights of the experts both tasks use, which costs the new task some of what it learnt)
    assert matrix[1][1] >= (0.9 if preset == "llava_cmoe" else 0.25), matrix
