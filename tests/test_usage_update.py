"""One step's accesses added to the usage statistics (``memlayers.ops.usage_update``): the numba kernel
(``cpu_usage.py``) against the reference, and ``UsageTracker`` through either."""

import pytest
import torch
from conftest import count_calls

from memlayers.metrics import UsageTracker
from memlayers.ops.usage_update import reference

BUFFERS = ("counts", "mass", "subkey_counts", "last_seen")


def state(N, H, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "counts": torch.rand(N, generator=g),
        "mass": torch.rand(N, generator=g),
        "subkey_counts": torch.rand(H, 2, n, generator=g),
        "last_seen": torch.randint(-1, 5, (N,), generator=g),
    }


@pytest.mark.parametrize("T,H,k,n", [(0, 2, 3, 4), (1, 1, 1, 1), (50, 2, 8, 9), (700, 4, 16, 32)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("product_keys", [True, False])
def test_kernel_matches_reference(T, H, k, n, masked, product_keys):
    """Repeated ids, masked tokens, with and without sub-key counts: the same floats as the reference."""
    cpu_usage = pytest.importorskip("memlayers.ops.usage_update.cpu_usage")
    N = n * n
    ids = torch.randint(0, N, (T, H, k))
    ids[T // 2 :, :, 0] = 3 % N  # repeats
    weights = torch.randn(T, H, k)
    mask = torch.rand(T) < 0.7 if masked else None
    step = torch.tensor(6)
    want, got = state(N, H, n if product_keys else 0), state(N, H, n if product_keys else 0)
    reference.usage_update(*want.values(), step, ids, weights, mask, 0.99)
    cpu_usage.usage_update_cpu(*got.values(), step, ids, weights, mask, 0.99)
    for name in BUFFERS:
        assert torch.equal(got[name], want[name]), name


def test_kernel_refuses_ids_outside_the_table():
    cpu_usage = pytest.importorskip("memlayers.ops.usage_update.cpu_usage")
    s = state(16, 1, 4)
    for bad in (16, -1):
        ids = torch.zeros(2, 1, 3, dtype=torch.long)
        ids[1, 0, 2] = bad
        with pytest.raises(IndexError, match=r"indices must be in \[0, 16\)"):
            cpu_usage.usage_update_cpu(*s.values(), torch.tensor(0), ids, torch.ones(2, 1, 3), None, 0.9)


def test_tracker_through_the_kernel_equals_the_reference(monkeypatch):
    """A tracker updated with large steps (the kernel) holds the reference's statistics and summary."""
    pytest.importorskip("numba")
    calls = count_calls(monkeypatch, "memlayers.ops.usage_update.cpu_usage", "usage_update_cpu")
    trackers = []
    for env in ("1", "0"):
        monkeypatch.setenv("MEMLAYERS_CPU_KERNELS", env)
        torch.manual_seed(0)
        t = UsageTracker(64, heads=4, window=5)
        for _ in range(7):  # 1,200 tokens x 4 heads x 8: above CPU_KERNEL_MIN_ELEMENTS
            t.update(torch.randint(0, 64 * 64, (1200, 4, 8)), torch.randn(1200, 4, 8), torch.rand(1200) < 0.9)
        trackers.append(t)
    assert len(calls) == 7
    for name in (*BUFFERS, "_step", "_tokens", "_window_accesses"):
        assert torch.equal(getattr(trackers[0], name), getattr(trackers[1], name)), name
    assert trackers[0].summary() == trackers[1].summary()


def test_kernel_refuses_what_it_cannot_write():
    """Ids past the sub-key grid (n²) when the table has more slots, and mismatched weights or mask."""
    cpu_usage = pytest.importorskip("memlayers.ops.usage_update.cpu_usage")
    s = state(100, 1, 4)  # 100 slots, sub-keys of a 4 x 4 grid
    ids, w = torch.zeros(2, 1, 3, dtype=torch.long), torch.ones(2, 1, 3)
    ids[0, 0, 1] = 16
    with pytest.raises(IndexError, match=r"indices must be in \[0, 16\)"):
        cpu_usage.usage_update_cpu(*s.values(), torch.tensor(0), ids, w, None, 0.9)
    ids[0, 0, 1] = 0
    for weights, mask in ((w[:, :, :2], None), (w, torch.ones(3, dtype=torch.bool))):
        with pytest.raises(ValueError, match="need ids and weights"):
            cpu_usage.usage_update_cpu(*s.values(), torch.tensor(0), ids, weights, mask, 0.9)


def test_a_masked_nan_weight_adds_nothing():
    cpu_usage = pytest.importorskip("memlayers.ops.usage_update.cpu_usage")
    ids, w = torch.tensor([[[0, 1]], [[2, 2]]]), torch.tensor([[[1.0, 2.0]], [[float("nan"), 3.0]]])
    mask = torch.tensor([True, False])
    runs = []
    for update in (reference.usage_update, cpu_usage.usage_update_cpu):
        s = {name: t.zero_() if t.is_floating_point() else t.fill_(-1) for name, t in state(9, 1, 3).items()}
        update(*s.values(), torch.tensor(4), ids, w, mask, 0.5)
        runs.append(s)
    for name in BUFFERS:
        assert torch.equal(runs[0][name], runs[1][name]), name
    assert runs[0]["mass"][2] == 0 and runs[0]["last_seen"][2] == -1
