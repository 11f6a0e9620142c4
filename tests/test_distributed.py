"""Two CPU processes (gloo) through the synthetic stream: DDP, and DeepSpeed ZeRO-2 and ZeRO-3.

Every run trains three tasks with `scripts/continual_stream.py` under ``torchrun`` and dumps
each rank's final adapter state (gathered under ZeRO-3), its accuracy matrix and every path it
wrote. ZeRO partitions the adapter, so the steps between tasks (growing and consolidating experts,
the momentum merge, locating, saving) must gather it; these tests hold them to DDP's results.
"""

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
from peft import LoraConfig, PeftModel, get_peft_model

from cmoe_adapters import ContinualMoEConfig, zero3

pytestmark = pytest.mark.multiprocess  # several processes: the newest dependency set only in CI

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


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[dict, dict]:
    return run_stream(tmp_path_factory.mktemp("ddp"))


def zero_arguments(stage: int) -> list[str]:
    """ZeRO-3 also runs with activation checkpointing, which the trainer makes reentrant there."""
    return ["--zero-stage", str(stage), *(["--checkpointing"] if stage == 3 else [])]


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
def test_zero3_trains_and_saves_the_plain_lora_baseline(tmp_path):
    rank0, rank1 = run_stream(tmp_path, "--zero-stage", "3", "--lora")
    assert_ranks_identical(rank0, rank1, locator=False)
    assert all(float(value.abs().sum()) > 0 for key, value in rank0["state"].items() if "lora_B" in key)
    assert_saved_adapter_is(tmp_path / "out" / "high", rank0["state"])


@needs_deepspeed
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
