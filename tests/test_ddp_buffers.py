"""DDP leaves the adapter's per-task buffers alone: what it broadcasts per forward does not grow with tasks.

The names come from `cmoe_adapters.ddp.buffers_to_ignore`, which DDP reads through the private
``_ddp_params_and_buffers_to_ignore`` attribute; the first test fails loudly if torch stops reading it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from distributed_runs import torchrun
from peft import get_peft_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cmoe_adapters import ContinualMoEConfig, ddp

pytestmark = pytest.mark.multiprocess  # several processes: the newest dependency set only in CI

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "ddp_buffers.py"

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def is_adapter_buffer(name: str) -> bool:
    return bool({"cmoe_locator", "cmoe_routers", "cmoe_experts"} & set(name.split(".")[:-1]))


def test_torch_ddp_still_reads_the_ignore_attribute():
    """If this fails, torch changed its private seam: `cmoe_adapters/ddp.py` must follow it."""
    source = inspect.getsource(DistributedDataParallel.__init__)
    assert f"module.{ddp.IGNORE_ATTRIBUTE}" in source, "DDP no longer reads _ddp_params_and_buffers_to_ignore"
    setter = inspect.getsource(DistributedDataParallel._set_params_and_buffers_to_ignore_for_model)
    assert f"module.{ddp.IGNORE_ATTRIBUTE} = " in setter


def test_ignore_list_names_every_adapter_buffer_from_both_roots():
    model = tiny_llama()
    model.model.register_buffer("cmoe_locator_scale", torch.ones(2))  # a substring is no adapter module
    model.model.cmoe_routers_like = nn.Module()
    model.model.cmoe_routers_like.register_buffer("cmoe_experts", torch.ones(2))
    peft_model = get_peft_model(model, ContinualMoEConfig(r=4, num_experts=2, top_k=1, locator_steps=2))
    for name in ("a", "b"):
        peft_model.add_task(name)
        peft_model.fit_locator(name, features=torch.randn(16, 32))
    tuner = peft_model.base_model
    ignored = ddp.buffers_to_ignore(tuner)
    own = [name for name, _ in tuner.named_buffers() if is_adapter_buffer(name)]
    assert any(".cmoe_routers." in name for name in own) and any("cmoe_locator." in name for name in own)
    assert ignored == own + [f"base_model.{name}" for name in own]
    for outsider in ("rotary_emb", "cmoe_locator_scale", "cmoe_routers_like"):
        assert not any(outsider in name for name in ignored), outsider
    peft_names = {name for name, _ in peft_model.named_buffers()}
    assert {f"base_model.{name}" for name in own} <= peft_names
    # DDP reads the attribute on the PeftModel it wraps, which forwards it to the tuner
    assert peft_model._ddp_params_and_buffers_to_ignore == ignored
    # names the HF model itself asks DDP to ignore are kept, from both roots
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["model.cmoe_locator_scale"])
    assert ddp.buffers_to_ignore(tuner)[len(own)] == "model.model.cmoe_locator_scale"
    assert "base_model.model.model.cmoe_locator_scale" in ddp.buffers_to_ignore(tuner)


def byte_size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def broadcast(rank0: dict, rank1: dict) -> dict[str, int]:
    """Rank 1's buffers that held rank 0's values when the forward began (sentinels before): name -> bytes."""
    seen, reference = rank1["seen"], rank0["before"]
    assert seen.keys() == reference.keys()
    return {
        name: byte_size(value)
        for name, value in seen.items()
        if value.numel() and torch.equal(value, reference[name])
    }


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> tuple[dict, dict]:
    dump = tmp_path_factory.mktemp("ddp_buffers")
    finished = torchrun(SCRIPT, str(dump))
    assert finished.returncode == 0, f"{finished.stdout[-3000:]}\n{finished.stderr[-6000:]}"
    return torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")


@needs_gloo
def test_ddp_broadcasts_no_adapter_buffer_whatever_the_number_of_tasks(dumps):
    rank0, rank1 = dumps
    sizes = {}
    for tasks in ("1", "4"):
        sent = broadcast(rank0[tasks], rank1[tasks])
        names = rank0[tasks]["before"].keys()
        adapter = [name for name in names if is_adapter_buffer(name) and rank0[tasks]["before"][name].numel()]
        leaked = sorted(set(adapter) & set(sent))
        assert adapter and not leaked, f"{tasks} task(s): {len(leaked)} adapter buffers sent: {leaked[:3]}"
        base = [name for name in names if not is_adapter_buffer(name)]
        assert any("rotary_emb.inv_freq" in name for name in base)
        assert set(sent) == set(base), f"{tasks} task(s): the base model's buffers are still broadcast"
        assert set(adapter) <= set(rank1[tasks]["ignored"])
        sizes[tasks] = sum(sent.values())
    assert sizes["1"] == sizes["4"] > 0
    # the measurement sees a broadcast when there is one: with the ignore list hidden from DDP, the
    # adapter's buffers are broadcast too
    control = broadcast(rank0["control"], rank1["control"])
    assert any(is_adapter_buffer(name) for name in control) and sum(control.values()) > sizes["4"]


@needs_gloo
def test_locators_agree_across_ranks_after_fitting(dumps):
    rank0, rank1 = dumps
    per_task = None
    for tasks in ("1", "4"):
        locator = [name for name in rank0[tasks]["before"] if "cmoe_locator" in name.split(".")]
        per_task = per_task or len(locator)
        assert locator and len(locator) == int(tasks) * per_task
        for name in locator:
            assert torch.equal(rank0[tasks]["before"][name], rank1[tasks]["before"][name]), name
        fitted = [name for name in locator if name.endswith(".fitted")]
        assert all(bool(rank0[tasks]["before"][name]) for name in fitted)
    assert rank0["property"] == rank1["property"] and rank0["property"]
