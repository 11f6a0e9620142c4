"""Sparse top-k LoRA experts: each token pays for the `k` experts it is routed to, not for all.

The tokens' ``(token, slot)`` pairs are sorted by expert, and both LoRA products run as one grouped
matrix multiply over the experts (`torch.nn.functional.grouped_mm`, with a per-expert loop where
its kernel cannot take the operands). A small autograd function keeps what backward needs to
``O(tokens * k * r)``: the input rows gathered per slot (``tokens * k * d_in``) are gathered again
from the layer input in backward -- the base layer keeps that input alive anyway -- instead of
being saved.

Whether the sparse or the dense stacked computation is faster depends on how many experts a task
can choose from, `k`, the rank, the device and the dtype (`prefer_sparse`); the choice is made per
task from those alone, never from what later tasks added, so an old task's outputs stay the same
bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Dense stacked experts cost ``E * r`` per token, the sparse path ``k * r`` plus a gather and a
# scatter of the token rows. On CPU those are memory-bound: measured forward+backward on one thread
# (d=512, 2048 tokens, r=8; benchmarks/layer_speed.py, "sparse vs dense"), sparse / dense is 1.03 at
# 8 experts and 0.91 at 16 for top-1, 1.25 at 16 and 0.86 at 32 for top-2: sparse pays off from
# about 12 experts per routed slot. On CUDA grouped_mm runs in bf16 (SM80+) and the gathers are
# cheap next to it; that threshold is an estimate (no GPU measurement yet).
_SPARSE_MIN_EXPERTS_PER_K = {"cpu": 12, "cuda": 2}
_GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def prefer_sparse(num_experts: int, top_k: int | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a task routing to `top_k` of `num_experts` experts runs faster on the sparse path."""
    if top_k is None or top_k >= num_experts:
        return False
    if dtype not in _GROUPED_MM_DTYPES.get(device.type, ()):
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return num_experts >= _SPARSE_MIN_EXPERTS_PER_K.get(device.type, 12) * top_k


def _kernel_accepts(*operands: torch.Tensor) -> bool:
    """grouped_mm's kernels need supported dtypes and 16-byte aligned pointers and strides."""
    for tensor in operands:
        if tensor.dtype not in _GROUPED_MM_DTYPES.get(tensor.device.type, ()):
            return False
        size = tensor.element_size()
        strides = [s for s, n in zip(tensor.stride(), tensor.shape, strict=True) if s != 1 and n > 1]
        if tensor.data_ptr() % 16 or any(s * size % 16 for s in strides):
            return False
    return True


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a[group rows] @ b[group]`` for 2-D `a` sorted by group and 3-D `b` (``offs``: group ends)."""
    if _kernel_accepts(a, b):
        return F.grouped_mm(a, b, offs=offs)
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for group, end in enumerate(offs.tolist()):  # one host sync; only where the kernel cannot run
        torch.mm(a[start:end], b[group], out=out[start:end])
        start = end
    return out


def grouped_outer(a_t: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group ``a_t[:, rows] @ b[rows]`` -> ``[groups, a_t.shape[0], b.shape[1]]`` (weight gradients)."""
    if _kernel_accepts(a_t, b):
        return F.grouped_mm(a_t, b, offs=offs)
    out = a_t.new_zeros(offs.shape[0], a_t.shape[0], b.shape[1])
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a_t[:, start:end], b[start:end], out=out[group])
        start = end
    return out


class _SparseLoRA(torch.autograd.Function):
    """``out[n] = sum_slot w[n, slot] * B[e] (A[e] x[n])`` with ``e = expert[n, slot]``."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, expert, gate):
        # x [N, d_in]; weight_a [G, r, d_in]; weight_b [G, r, d_out]; expert, gate [N, k]
        num_groups, k = weight_a.shape[0], expert.shape[1]
        flat = expert.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        offs = torch.bincount(flat, minlength=num_groups).cumsum(0).to(torch.int32)
        hidden = grouped_mm(x.index_select(0, token), weight_a.transpose(1, 2), offs)  # [N*k, r]
        slot_gate = gate.reshape(-1).index_select(0, order).to(hidden.dtype)
        rows = grouped_mm(hidden * slot_gate[:, None], weight_b, offs)  # [N*k, d_out]
        out = rows.new_zeros(x.shape[0], weight_b.shape[-1]).index_add_(0, token, rows)
        ctx.save_for_backward(x, weight_a, weight_b, order, token, offs, hidden, slot_gate)
        ctx.gate_shape, ctx.gate_dtype = gate.shape, gate.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_a, weight_b, order, token, offs, hidden, slot_gate = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_rows = grad_out.index_select(0, token)  # [N*k, d_out]
        grad_gated = grouped_mm(grad_rows, weight_b.transpose(1, 2), offs)  # [N*k, r]
        grad_x = grad_a = grad_b = grad_gate = None
        if ctx.needs_input_grad[4]:
            per_slot = (grad_gated * hidden).sum(-1)
            grad_gate = torch.empty_like(per_slot).index_copy_(0, order, per_slot)
            grad_gate = grad_gate.reshape(ctx.gate_shape).to(ctx.gate_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grouped_outer((hidden * slot_gate[:, None]).t(), grad_rows, offs)
        grad_hidden = grad_gated * slot_gate[:, None]
        if ctx.needs_input_grad[1]:
            inputs = x.index_select(0, token)  # gathered again rather than kept since forward
            grad_a = grouped_outer(grad_hidden.t(), inputs, offs)
        if ctx.needs_input_grad[0]:
            grad_rows_x = grouped_mm(grad_hidden, weight_a, offs)  # [N*k, d_in]
            grad_x = torch.zeros_like(x).index_add_(0, token, grad_rows_x)
        return grad_x, grad_a, grad_b, None, grad_gate


def sparse_lora(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    expert: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """The top-k mixture of LoRA experts for tokens ``x [..., d_in]``.

    `weight_a` ``[G, r, d_in]`` and `weight_b` ``[G, r, d_out]`` are the experts, `expert`
    ``[..., k]`` the chosen expert of each token's slots and `gate` ``[..., k]`` their weights
    (a zero weight may pad a slot). Returns ``[..., d_out]``.
    """
    lead = x.shape[:-1]
    out = _SparseLoRA.apply(
        x.reshape(-1, x.shape[-1]),
        weight_a,
        weight_b,
        expert.reshape(-1, expert.shape[-1]),
        gate.reshape(-1, gate.shape[-1]),
    )
    return out.reshape(*lead, weight_b.shape[-1])
