"""Two CPU processes (gloo) through the synthetic stream: DDP, and DeepSpeed ZeRO-2 and ZeRO-3.

Every run trains three tasks with `scripts/continual_stream.py` under ``torchrun`` and dumps
each rank's final adapter state (gathered under ZeRO-3), its accuracy matrix and every path it
wrote. ZeRO partitions the adapter, so the steps between tasks (growing and consolidating experts,
the momentum merge, locating, saving) must gather it; these tests hold them to DDP's results.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from distributed_runs import (
    RANK_1_OWN_FILES,
    SCRIPT,
    assert_ranks_identical,
    assert_saved_adapter_is,
    load_dumps,
    needs_deepspeed,
    run_stream,
    torchrun,
    zero_arguments,
)
from peft import LoraConfig, get_peft_model

from cmoe_adapters import ContinualMoEConfig, zero3

pytestmark = pytest.mark.multiprocess  # several processes: the newest dependency set only in CI


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[dict, dict]:
    return run_stream(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """``zero_run(stage) -> (folder, rank0, rank1)``, each stage trained once per module."""
    runs: dict[int, tuple[Path, dict, dict]] = {}

    def run(stage: int) -> tuple[Path, dict, dict]:
        if stage not in runs:
            folder = tmp_path_factory.mktemp(f"zero{stage}")
            runs[stage] = (folder, *run_stream(folder, *zero_arguments(stage)))
        return runs[stage]

    return run


def test_zero3_helpers_pick_adapter_parameters_only_and_do_nothing_without_deepspeed():
    moe = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    moe.add_task("a")
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for model, marker in ((moe, "cmoe_"), (lora, "lora_")):
        expected = [p for name, p in model.named_parameters() if marker in name]
        assert expected and zero3.adapter_parameters(model) == expected
    parameter = zero3.adapter_parameters(moe)[0]
    with zero3.gathered([parameter], modify=True):  # plain tensors: nothing to gather
        assert zero3.full_shape(parameter) == parameter.shape and not zero3.is_partitioned(parameter)


def test_ddp_gives_identical_ranks_and_only_rank_0_writes(ddp_run):
    rank0, rank1 = ddp_run
    assert rank0["matrix"] == rank1["matrix"]
    assert_ranks_identical(rank0, rank1)
    assert rank0["written"], "rank 0 writes the results"
    assert all(RANK_1_OWN_FILES.match(path) for path in rank1["written"]), rank1["written"]


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp_across_tasks(stage, zero_run, ddp_run):
    folder, rank0, rank1 = zero_run(stage)
    assert_ranks_identical(rank0, rank1)
    reference = ddp_run[0]
    assert rank0["state"].keys() == reference["state"].keys()
    # the same training; only reduction order differs (and, for ZeRO-3, checkpointing's recompute order).
    # Without the balancing loss (coefficient 0.5) routers would differ by up to 0.47, experts by 0.08.
    atol = 2e-4 if stage == 3 else 1e-5
    for key, value in reference["state"].items():
        torch.testing.assert_close(rank0["state"][key], value, rtol=1e-4, atol=atol, msg=key)
    for row, reference_row in zip(rank0["matrix"], reference["matrix"], strict=True):
        assert row == pytest.approx(reference_row, abs=1 / 24 + 1e-6)  # at most one answer of 24 apart
    assert rank0["matrix"] == rank1["matrix"]
    assert all(RANK_1_OWN_FILES.match(path) for path in rank1["written"]), rank1["written"]
    # DeepSpeed really ran: rank 1 wrote its engine's partitions (ZeRO-3 also partitions the model)
    partitions = "model_states" if stage == 3 else "optim_states"
    assert any(path.endswith(f"zero_pp_rank_1_mp_rank_00_{partitions}.pt") for path in rank1["written"])
    assert_saved_adapter_is(folder / "out" / "high", rank0["state"])
    # the balancing loss (coefficient 0.5) is counted once per layer: logged as without DeepSpeed and
    # checkpointing, and its gradient arrived (the routers above equal DDP's), also when ZeRO-3's
    # reentrant checkpointing runs each layer's forward without autograd and its recompute adds it
    logged, reference_logged = rank0["router_aux_loss"], reference["router_aux_loss"]
    assert len(logged) == len(reference_logged) == 9 and min(logged) > 0
    assert logged == pytest.approx(reference_logged, rel=1e-4)


@needs_deepspeed
def test_zero3_resumes_after_kill_9_exactly(zero_run, tmp_path):
    _, uninterrupted, _ = zero_run(3)
    arguments = [str(tmp_path / "out"), "--ddp", *zero_arguments(3)]
    killed = torchrun(SCRIPT, *arguments, "--kill-at", "mid:20")
    assert killed.returncode != 0, "both processes must really die by SIGKILL"
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints" / "mid")) == ["checkpoint-16", "checkpoint-8"]
    resumed = torchrun(SCRIPT, *arguments, "--resume", "--dump", str(tmp_path / "dump"))
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    rank0, rank1 = load_dumps(tmp_path / "dump")
    assert_ranks_identical(rank0, rank1)
    assert rank0["matrix"] == uninterrupted["matrix"]
    for key, value in uninterrupted["state"].items():
        assert torch.equal(rank0["state"][key], value), key


def test_zero3_switches_activation_checkpointing_to_reentrant(monkeypatch, tmp_path):
    """Non-reentrant checkpointing fails under ZeRO-3 with frozen parameters (a DeepSpeed bug)."""
    import transformers.integrations

    from cmoe_adapters import ContinualTrainingArguments
    from cmoe_adapters._compat import (
        activation_checkpointing,
        checkpointing_argument,
        with_checkpointing_kwargs,
    )
    from cmoe_adapters.trainer import _reentrant_checkpointing_under_zero3

    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    args = ContinualTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], **checkpointing_argument(True)
    )
    args = with_checkpointing_kwargs(args, {"use_reentrant": False})
    assert _reentrant_checkpointing_under_zero3(model, args) is args, "nothing changes without ZeRO-3"
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.warns(UserWarning, match="use_reentrant=False does not work with DeepSpeed ZeRO-3"):
        changed = _reentrant_checkpointing_under_zero3(model, args)
    assert activation_checkpointing(changed) == (True, {"use_reentrant": True})
    assert activation_checkpointing(args) == (True, {"use_reentrant": False}), "caller's args untouched"
    embeddings = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeddings.requires_grad, "reentrant checkpointing needs inputs that require grad"
