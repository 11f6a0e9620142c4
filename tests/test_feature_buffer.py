"""`FeatureBuffer`: the locator's reservoir sample, filled at every training step without a host sync."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cmoe_adapters.locator import FeatureBuffer


def numbered_rows(start: int, count: int, dim: int = 3) -> torch.Tensor:
    """Rows whose every entry is the row's number in the stream (so a kept row tells where it came from)."""
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].expand(count, dim).clone()


def stream_into(buffer: FeatureBuffer, sizes: list[int], start: int = 0) -> int:
    for size in sizes:
        buffer.add(numbered_rows(start, size))
        start += size
    return start


def kept_numbers(buffer: FeatureBuffer) -> list[int]:
    return buffer.tensor()[:, 0].long().tolist()


def algorithm_r(capacity: int, seed: int, total: int) -> list[int]:
    """Algorithm R one row at a time, with the buffer's draws: row n (1-based) takes slot floor(u * n)."""
    generator = torch.Generator().manual_seed(seed)
    slots: list[int] = []
    for number in range(1, total + 1):
        if len(slots) < capacity:
            slots.append(number - 1)
            continue
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        slot = min(int(u * number), number - 1)
        if slot < capacity:
            slots[slot] = number - 1
    return slots


def test_fills_then_keeps_capacity_rows_in_fp32():
    buffer = FeatureBuffer(capacity=5, seed=0)
    with pytest.raises(ValueError, match="No locator features"):
        buffer.tensor()
    buffer.add(numbered_rows(0, 3).half())
    assert len(buffer) == 3 and buffer.seen == 3 and kept_numbers(buffer) == [0, 1, 2]
    assert buffer.tensor().dtype == torch.float32
    buffer.add(numbered_rows(3, 0))
    buffer.add(numbered_rows(3, 20))
    assert len(buffer) == 5 and buffer.seen == 23 and buffer.tensor().shape == (5, 3)
    assert len(set(kept_numbers(buffer))) == 5 and all(0 <= n < 23 for n in kept_numbers(buffer))
    with pytest.raises(ValueError, match="dimension 4"):
        buffer.add(torch.zeros(2, 4))


@pytest.mark.parametrize("sizes", [[1] * 60, [7] * 9, [60], [3, 25, 1, 31]])
def test_batched_adds_are_algorithm_r_row_by_row(sizes):
    """Vectorised replacement equals the one-row-at-a-time algorithm, duplicate slots in a batch included."""
    buffer = FeatureBuffer(capacity=8, seed=3)
    total = stream_into(buffer, sizes)
    assert kept_numbers(buffer) == algorithm_r(8, 3, total)


def test_sample_is_uniform_over_the_stream():
    """Every row of the stream is kept with probability capacity / rows, early ones as late ones."""
    capacity, total, runs = 10, 100, 1500
    kept = torch.zeros(total)
    for seed in range(runs):
        buffer = FeatureBuffer(capacity, seed=seed)
        stream_into(buffer, [7] * 14 + [2])  # batches that straddle the capacity, duplicates likely
        kept[kept_numbers(buffer)] += 1
    frequency = kept / runs
    expected = capacity / total
    assert kept.sum() == capacity * runs
    early, late = frequency[:capacity].mean(), frequency[-capacity:].mean()
    # each group mean has a standard deviation of about 0.0025: these bounds are ~6 of them
    assert abs(early - expected) < 0.015 and abs(late - expected) < 0.015, (early, late)
    assert frequency.min() > 0.05 and frequency.max() < 0.15, frequency  # per row: std ~0.008


def test_same_seed_same_sample_other_seed_other_sample():
    def sample(seed: int) -> torch.Tensor:
        buffer = FeatureBuffer(capacity=16, seed=seed)
        stream_into(buffer, [9] * 20)
        return buffer.tensor()

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_restore_continues_exactly_like_an_uninterrupted_buffer():
    sizes = [5, 11, 3, 8, 13, 2, 9, 7]
    uninterrupted = FeatureBuffer(capacity=12, seed=4)
    stream_into(uninterrupted, sizes)

    before = FeatureBuffer(capacity=12, seed=4)
    start = stream_into(before, sizes[:4])
    # what a Trainer checkpoint keeps: the rows (safetensors), seen and the sampler state (json)
    saved = json.loads(json.dumps({"seen": before.seen, "random_state": before.random_state()}))
    after = FeatureBuffer(capacity=12, seed=99)  # a fresh process builds its buffer with some seed
    after.restore(before.tensor().clone(), saved["seen"], saved["random_state"])
    stream_into(after, sizes[4:], start=start)

    assert after.seen == uninterrupted.seen and len(after) == len(uninterrupted)
    assert torch.equal(after.tensor(), uninterrupted.tensor())
    assert after.random_state() == uninterrupted.random_state()
    with pytest.raises(ValueError, match="min\\(seen, capacity\\)"):
        after.restore(torch.zeros(3, 3), 20, saved["random_state"])


def test_restore_reads_the_former_python_random_state():
    """Checkpoints written before the rewrite kept Python's `random` state: resuming from one works."""
    version, state, gauss = random.Random(0).getstate()
    legacy = json.loads(json.dumps([version, list(state), gauss]))
    buffers = []
    for _ in range(2):
        buffer = FeatureBuffer(capacity=4, seed=0)
        buffer.restore(numbered_rows(0, 4), 10, legacy)
        stream_into(buffer, [6, 6], start=10)
        buffers.append(buffer)
    assert buffers[0].seen == 22 and torch.equal(buffers[0].tensor(), buffers[1].tensor())


def test_add_never_reads_device_data_on_the_host(monkeypatch):
    """On "meta" tensors (no data at all) every host read would fail; `add` must not need one."""
    buffer = FeatureBuffer(capacity=6, seed=0)
    buffer.restore(numbered_rows(0, 6), 6, FeatureBuffer(6, seed=0).random_state())  # rows on the CPU
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):

        def refuse(*args, name=name, **kwargs):
            raise AssertionError(f"FeatureBuffer.add called Tensor.{name}")

        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(5):
        buffer.add(torch.zeros(8, 3, device="meta", dtype=torch.bfloat16))
    monkeypatch.undo()
    assert buffer.seen == 46 and len(buffer) == 6
    rows = buffer.tensor()
    assert rows.device.type == "meta" and rows.shape == (6, 3) and rows.dtype == torch.float32
