"""The published methods and the plain LoRA baseline under DeepSpeed ZeRO-3 on two CPU processes.

Probe expansion and the momentum merge gather partitioned experts between tasks; an expert that
gets no tokens on one rank must not make ZeRO-3 wait for its gradient there.
"""

from __future__ import annotations

import pytest
from distributed_runs import (
    ROOT,
    assert_ranks_identical,
    assert_saved_adapter_is,
    needs_deepspeed,
    run_stream,
    torchrun,
)

pytestmark = pytest.mark.multiprocess  # several processes: the newest dependency set only in CI


@needs_deepspeed
@pytest.mark.parametrize("preset", ["llava_cmoe", "cl_moe"])
def test_zero3_runs_the_methods_when_experts_get_no_tokens_on_one_rank(preset, tmp_path):
    """Probe expansion and the momentum merge under ZeRO-3, with experts 1+ starved on rank 1.

    An expert that receives no tokens on one process must not make ZeRO-3 wait for its gradient
    there: the mixture is computed densely, so every expert takes part in every pass.
    """
    rank0, rank1 = run_stream(tmp_path, "--zero-stage", "3", "--preset", preset, "--starve-rank", "1")
    assert rank1["tokens_to_other_experts"] == 0 and rank0["tokens_to_other_experts"] > 0
    assert_ranks_identical(rank0, rank1)
    assert [len(row) for row in rank0["matrix"]] == [1, 2, 3]
    assert_saved_adapter_is(tmp_path / "out" / "high", rank0["state"])


@needs_deepspeed
@pytest.mark.slow  # minutes on 2 cores; the MoE's ZeRO-3 save path, which it shares, runs in every CI
def test_zero3_trains_and_saves_the_plain_lora_baseline(tmp_path):
    rank0, rank1 = run_stream(tmp_path, "--zero-stage", "3", "--lora")
    assert_ranks_identical(rank0, rank1, locator=False)
    assert all(float(value.abs().sum()) > 0 for key, value in rank0["state"].items() if "lora_B" in key)
    assert_saved_adapter_is(tmp_path / "out" / "high", rank0["state"])


@needs_deepspeed
@pytest.mark.slow  # minutes on 2 cores; the library's ZeRO-3 path is the stream tests' (test_distributed)
def test_llava_coin_example_runs_under_zero3_with_the_shipped_config(tmp_path):
    """The real example (tiny LLaVA, real processor, generative evaluation, activation
    checkpointing) with zero3.json."""
    output_dir = tmp_path / "out"
    finished = torchrun(
        ROOT / "examples" / "llava_coin.py",
        "--tiny",
        "--output-dir",
        str(output_dir),
        "--save-steps",
        "6",
        "--deepspeed",
        str(ROOT / "examples" / "deepspeed" / "zero3.json"),
    )
    assert finished.returncode == 0, f"{finished.stdout[-3000:]}\n{finished.stderr[-6000:]}"
    tasks = ["ScienceQA", "ImageNet", "Grounding"]
    for task in tasks:
        assert (output_dir / task / "adapter_model.safetensors").is_file(), task
        # only ZeRO-3 checkpoints hold a model-state partition per rank: DeepSpeed really ran
        partitions = output_dir.glob(
            f"checkpoints/{task}/checkpoint-*/global_step*/zero_pp_rank_1_*model_states.pt"
        )
        assert any(partitions), f"no ZeRO-3 checkpoint for {task}"
    assert "locator_accuracy" in (output_dir / "results.json").read_text()
