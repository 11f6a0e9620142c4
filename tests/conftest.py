"""Shared fixtures: tiny models built from config (no downloads)."""

from __future__ import annotations

import os
import warnings

# One thread per process: on a small machine (CI has 2 cores) torch's intra-op thread pool costs
# far more than it gains on these tiny models, 3-4x slower with two threads competing with other
# work. The subprocesses the tests start (examples, scripts, torchrun) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import transformers

import cmoe_adapters  # noqa: F401  (registers the method with peft)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# the longest test files, started first (with --no-loadscope-reorder) so that the two xdist workers
# share them: the first two files go to one worker each, the next two after them, then the rest
LONGEST_FIRST = (
    "test_distributed.py",  # worker 1
    "test_faults.py",  # worker 2
    "test_faults_cl_moe.py",  # worker 1
    "test_zero3_methods.py",  # worker 2
    "test_examples.py",
    "test_trl.py",
    "test_recipes.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, random weights, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        **overrides,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, 97, (3, 7), generator=generator)


def randomize_experts(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every expert B (zero at init) and router random values so mixtures matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "cmoe_experts" in name or "cmoe_routers" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
