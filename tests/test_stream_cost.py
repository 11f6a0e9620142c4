"""A long stream costs the same per task: sparse top-k experts, bounded routers, no host reads."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_experts, tiny_llama
from peft import get_peft_model
from torch import nn

from cmoe_adapters import ContinualMoEConfig, ContinualMoELayer
from cmoe_adapters.routing import RoutingState, candidate_experts
from cmoe_adapters.sparse import grouped_mm, prefer_sparse, sparse_lora


def naive_sparse(x, weight_a, weight_b, expert, gate):
    """Token by token, slot by slot: ``sum_s gate * B_e (A_e x)``."""
    out = torch.zeros(x.shape[0], weight_b.shape[-1], dtype=x.dtype)
    for n in range(x.shape[0]):
        for slot in range(expert.shape[1]):
            e = expert[n, slot]
            out[n] += gate[n, slot] * (weight_b[e].T @ (weight_a[e] @ x[n]))
    return out


def random_problem(tokens=13, d_in=16, r=4, d_out=12, groups=5, k=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, dtype=dtype, generator=generator)
    weight_a = torch.randn(groups, r, d_in, dtype=dtype, generator=generator)
    weight_b = torch.randn(groups, r, d_out, dtype=dtype, generator=generator)
    expert = torch.stack([torch.randperm(groups, generator=generator)[:k] for _ in range(tokens)])
    gate = torch.rand(tokens, k, dtype=dtype, generator=generator)
    return [t.requires_grad_() if t.is_floating_point() else t for t in (x, weight_a, weight_b, expert, gate)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_experts_equal_a_naive_loop_with_gradients(dtype):
    """float64 runs the per-expert loop (grouped_mm has no float64 kernel), float32 the kernel."""
    x, a, b, expert, gate = random_problem(d_in=16, r=4, d_out=12, dtype=dtype)
    out = sparse_lora(x, a, b, expert, gate)
    expected = naive_sparse(x, a, b, expert, gate)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, expected, **tolerance)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a, b, gate), grad)
    want = torch.autograd.grad(expected, (x, a, b, gate), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, a, b, g: sparse_lora(x, a, b, expert, g), (x, a, b, gate))


def test_sparse_experts_take_an_expanded_gradient_and_empty_groups():
    """``out.sum().backward()`` hands backward a stride-0 gradient, which grouped_mm refuses as is."""
    x, a, b, expert, gate = random_problem(groups=6, k=1, dtype=torch.float32)
    expert = torch.zeros_like(expert)  # every token to expert 0: five empty groups
    sparse_lora(x, a, b, expert, gate).sum().backward()
    assert a.grad[1:].abs().sum() == 0 and a.grad[0].abs().sum() > 0


def test_grouped_mm_falls_back_where_the_kernel_cannot_run():
    a = torch.randn(7, 5, dtype=torch.float64)  # no float64 kernel, strides not 16-byte aligned
    b = torch.randn(3, 5, 2, dtype=torch.float64)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    expected = torch.cat([a[:2] @ b[0], a[2:7] @ b[2]])
    torch.testing.assert_close(grouped_mm(a, b, offs), expected)


def test_sparse_backward_keeps_no_gathered_copy_of_the_input():
    """What the sparse path saves for backward is O(tokens * k * r), not O(tokens * k * d_in)."""
    tokens, d_in, r, k = 64, 256, 4, 2
    problem = random_problem(tokens=tokens, d_in=d_in, r=r, d_out=d_in, k=k, dtype=torch.float32)
    x, a, b, expert, gate = problem
    known = {t.untyped_storage().data_ptr() for t in (x, a, b, expert, gate)}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_lora(x, a, b, expert, gate)
    gathered_copy = tokens * k * d_in * 4
    assert 0 < sum(saved.values()) < gathered_copy / 4, saved


def test_candidates_keep_own_experts_and_fill_by_preference_then_usage():
    assert candidate_experts(0, 4, 8) == [0, 1, 2, 3]
    assert candidate_experts(4, 4, 8) == list(range(8)), "room for every old expert"
    usage = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.9, 0.0, 0.0, 0.0])
    assert candidate_experts(8, 4, 8, old_usage=usage) == [1, 2, 4, 7, 8, 9, 10, 11]
    preferred = candidate_experts(8, 4, 8, preferred=[6, 0], old_usage=usage)
    assert preferred == [0, 1, 4, 6, 8, 9, 10, 11], "the probe's choice first, then by usage"
    assert candidate_experts(8, 4, 8) == [4, 5, 6, 7, 8, 9, 10, 11], "no usage: the newest old experts"
    assert candidate_experts(8, 4, None) == list(range(12)), "no cap: every expert"
    assert candidate_experts(8, 0, 4, preferred=[3, 2, 1, 0]) == [0, 1, 2, 3]


def make_stream_model(tasks: int, **config):
    settings = {"r": 4, "lora_alpha": 8, "num_experts": 4, "top_k": 2, **config}
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(**settings))
    for index in range(tasks):
        model.add_task(f"t{index}")
    randomize_experts(model)
    return model


def randomize_trainable(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def adapter_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".cmoe_" in n)


@pytest.mark.parametrize("experts_per_task", [4, 2])
def test_what_a_task_adds_does_not_grow_with_the_stream(experts_per_task):
    model = make_stream_model(0, experts_per_task=experts_per_task)
    added = []
    for index in range(12):
        before = adapter_parameters(model)
        model.add_task(f"t{index}")
        added.append(adapter_parameters(model) - before)
    assert added[1] == added[-1], added
    layer = next(m for m in model.modules() if isinstance(m, ContinualMoELayer))
    routers = layer.cmoe_routers["default"]
    assert [routers.num_experts(t) for t in range(12)] == [4] * 12, (
        "every task routes among as many as task 1"
    )
    newest = 4 + 10 * experts_per_task
    own = list(range(newest, newest + experts_per_task))
    assert routers.candidates(11)[-experts_per_task:] == own, "a task always reaches its own experts"
    if experts_per_task == 2:
        assert routers.candidates(11)[:2] == [newest - 2, newest - 1], "no usage yet: the newest old experts"


def test_records_without_a_cap_route_among_every_expert():
    """Adapters saved before `router_max_experts` existed keep their full routers."""
    config = ContinualMoEConfig(r=4, num_experts=2, top_k=1)
    config.task_records = [{"name": f"t{i}"} for i in range(6)]
    layer = ContinualMoELayer(nn.Linear(16, 12), "default", config, RoutingState(), layer_name="lin")
    assert [layer.cmoe_routers["default"].num_experts(t) for t in range(6)] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("top_k", [1, 2])
def test_old_tasks_stay_bit_identical_on_the_sparse_and_the_dense_path(input_ids, top_k):
    """Tasks with few candidates run dense, with many sparse; later tasks change neither."""
    model = make_stream_model(1, num_experts=2, experts_per_task=2, top_k=top_k, router_max_experts=24)
    layer = next(m for m in model.modules() if isinstance(m, ContinualMoELayer))
    outputs = {}
    for index in range(1, 12):
        model.add_task(f"t{index}")
        randomize_trainable(model, seed=index)  # as if trained: only the new task's parameters
        for name, logits in outputs.items():
            assert torch.equal(model(input_ids=input_ids, task=name).logits, logits), name
        outputs[f"t{index}"] = model(input_ids=input_ids, task=f"t{index}").logits
    paths = [
        prefer_sparse(layer.cmoe_routers["default"].num_experts(t), top_k, input_ids.device, torch.float32)
        for t in range(12)
    ]
    assert not paths[0] and paths[-1], "the stream must exercise both paths"


def force(model, compute: str) -> None:
    """Switch every layer to the dense or the sparse path (``expert_compute`` at creation does this)."""
    for layer in (m for m in model.modules() if isinstance(m, ContinualMoELayer)):
        layer.expert_compute["default"] = compute


@pytest.mark.parametrize("top_k", [1, 2, None])
def test_sparse_path_equals_dense_path_for_the_same_task(input_ids, top_k):
    model = make_stream_model(3, num_experts=4, top_k=top_k, expert_compute="dense")
    dense = model(input_ids=input_ids, task="t2").logits
    force(model, "sparse")
    torch.testing.assert_close(model(input_ids=input_ids, task="t2").logits, dense, atol=1e-5, rtol=1e-5)


def test_sparse_training_step_gives_the_dense_gradients(input_ids):
    model = make_stream_model(3, num_experts=4, top_k=2, expert_compute="dense")
    model.train()

    def gradients():
        model.zero_grad()
        out = model(input_ids=input_ids, labels=input_ids, task="t2")
        (out.loss + model.router_aux_loss()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    dense = gradients()
    force(model, "sparse")
    sparse = gradients()
    assert dense.keys() == sparse.keys() and len(dense) > 0
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("preset", ["default", "cl_moe", "dense"])
def test_mixed_task_batch_equals_each_sample_alone(input_ids, preset):
    config = {"default": {}, "cl_moe": {"dual_router": True}, "dense": {"top_k": None}}[preset]
    model = make_stream_model(12, num_experts=2, experts_per_task=2, router_max_experts=6, **config)
    if preset == "cl_moe":
        for layer in (m for m in model.modules() if isinstance(m, ContinualMoELayer)):
            routers = layer.cmoe_routers["default"]
            for task in range(0, len(routers), 2):  # half the tasks have a task-level gate
                routers.set_usage(task, torch.rand(routers.num_experts(task)))
    ids = input_ids.repeat(4, 1)[:4]
    names = ["t11", "t0", "t5", "t0"]
    mixed = model(input_ids=ids, task=names).logits
    for i, name in enumerate(names):
        alone = model(input_ids=ids[i : i + 1], task=name).logits[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)


class _HostReads:
    """Counts reads of tensor values into Python (host syncs on an accelerator)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counting(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)


@pytest.mark.parametrize("tasks", [3, 12])
def test_a_mixed_batch_forward_reads_nothing_per_layer(input_ids, monkeypatch, tasks):
    """Per-sample routing reads the device once per forward, whatever the layers and tasks."""
    model = make_stream_model(tasks).eval()
    ids = input_ids.repeat(2, 1)[:2]
    names = ["t0", f"t{tasks - 1}"]
    with torch.no_grad():
        model(input_ids=ids, task=names)  # builds the per-layer tables once
        model(input_ids=ids, task="t1")  # reads t1's candidate experts once
        reads = _HostReads(monkeypatch)
        model(input_ids=ids, task=names)
        model(input_ids=ids, task="t1")
    assert reads.count == 1, "only the routing state's one check that the samples' tasks differ"


def test_mixed_batches_pass_gradients_to_the_routers_on_every_backward(input_ids):
    """With gradients on, the per-sample router table is built in the graph of each forward."""
    model = make_stream_model(3)
    model.eval()  # evaluation mode, gradients on: e.g. attributions on a located batch
    layer = next(m for m in model.modules() if isinstance(m, ContinualMoELayer))
    layer.cmoe_routers["default"].router(2).requires_grad_(True)
    ids = input_ids.repeat(2, 1)[:2]
    for _ in range(2):
        model(input_ids=ids, task=["t0", "t2"]).logits.sum().backward()
    assert layer.cmoe_routers["default"].router(2).grad.abs().sum() > 0
