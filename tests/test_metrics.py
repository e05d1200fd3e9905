import math

import pytest
import torch
from torch import nn

from memlayers.metrics import UsageTracker, gini, kl_to_uniform, mass_quantile_counts

KEYS = (
    "coverage coverage_ideal coverage_ratio kl_unweighted kl_weighted usage_unweighted usage_weighted "
    "gini_unweighted gini_weighted top50 top90 top99 subkey_kl_first subkey_kl_second dead_subkeys "
    "tokens_seen updates"
).split()


def ids(i, j, n):
    """Flat slot ids from sub-key ids."""
    return torch.as_tensor(i) * n + torch.as_tensor(j)


def uniform_weights(indices):
    return torch.full(indices.shape, 1.0 / indices.shape[-1])


def assert_same_summary(a, b, rel=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        if math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-9), key


# ---------------------------------------------------------------------------- pure functions


def test_pure_functions_known_answers():
    N = 16
    uniform, point = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    point[5] = 3.0  # unnormalised on purpose
    assert kl_to_uniform(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert kl_to_uniform(point).item() == pytest.approx(math.log(N))
    assert gini(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert gini(point).item() == pytest.approx((N - 1) / N)
    assert mass_quantile_counts(uniform).tolist() == [8, 15, 16]  # ceil(q*N)
    assert mass_quantile_counts(point).tolist() == [1, 1, 1]

    # two-point distribution (0.75, 0.25) padded with zeros to M = 4
    p = torch.tensor([0.0, 0.75, 0.0, 0.25], dtype=torch.float64)
    assert kl_to_uniform(p).item() == pytest.approx(math.log(4) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    # ascending (0, 0, .25, .75), coefficients (2i - 5) = (-3, -1, 1, 3): (0.25 + 2.25) / 4
    assert gini(p).item() == pytest.approx(0.625)
    assert mass_quantile_counts(p).tolist() == [1, 2, 2]

    # batched over leading dims, and all-zero rows are NaN
    rows = torch.stack([uniform, point, torch.zeros(N, dtype=torch.float64)])
    kl = kl_to_uniform(rows)
    assert kl[:2].tolist() == pytest.approx([0.0, math.log(N)], abs=1e-12) and kl[2].isnan()
    assert gini(rows)[:2].tolist() == pytest.approx([0.0, (N - 1) / N], abs=1e-12)
    assert mass_quantile_counts(torch.zeros(4)).tolist() == [-1, -1, -1]


def test_quantile_counts_tolerate_rounding():
    # 1/3 sums are inexact in floating point: the 50% of 6 equal entries still takes 3 slots
    assert mass_quantile_counts(torch.ones(6, dtype=torch.float32), (0.5,)).tolist() == [3]
    assert mass_quantile_counts(torch.tensor([0.5, 0.3, 0.2]), (0.8, 0.81)).tolist() == [2, 3]


# ---------------------------------------------------------------------------- tracker: known answers


def test_empty_summary_is_nan_not_crash():
    s = UsageTracker(4, 2).summary()
    assert list(s) == KEYS
    assert all(math.isnan(s[key]) for key in KEYS[:-2])
    assert s["tokens_seen"] == 0.0 and s["updates"] == 0.0


def test_uniform_access_over_all_slots():
    n, N = 8, 64
    t = UsageTracker(n, heads=1, window=100)
    indices = torch.randperm(N).view(8, 1, 8)  # every slot exactly once
    t.update(indices, uniform_weights(indices))
    s = t.summary()
    assert s["kl_unweighted"] == pytest.approx(0.0, abs=1e-9)
    assert s["kl_weighted"] == pytest.approx(0.0, abs=1e-9)
    assert s["usage_unweighted"] == pytest.approx(1.0)
    assert s["gini_unweighted"] == pytest.approx(0.0, abs=1e-9)
    assert (s["top50"], s["top90"], s["top99"]) == (32, 58, 64)
    assert s["coverage"] == 1.0
    assert s["coverage_ideal"] == pytest.approx(1 - math.exp(-1))  # A = N
    assert s["coverage_ratio"] == pytest.approx(1 / (1 - math.exp(-1)))
    assert s["subkey_kl_first"] == pytest.approx(0.0, abs=1e-9)
    assert s["subkey_kl_second"] == pytest.approx(0.0, abs=1e-9)
    assert s["dead_subkeys"] == 0.0
    assert s["tokens_seen"] == 8 and s["updates"] == 1


def test_all_accesses_on_one_slot():
    n, N, H, k = 4, 16, 2, 3
    t = UsageTracker(n, heads=H)
    indices = torch.full((10, H, k), int(ids(2, 1, n)))
    t.update(indices, torch.rand(10, H, k))
    s = t.summary()
    for kind in ("unweighted", "weighted"):
        assert s[f"kl_{kind}"] == pytest.approx(math.log(N))
        assert s[f"usage_{kind}"] == pytest.approx(1 / N)
        assert s[f"gini_{kind}"] == pytest.approx((N - 1) / N)
    assert s["top50"] == s["top90"] == s["top99"] == 1
    assert s["coverage"] == 1 / N
    assert s["subkey_kl_first"] == pytest.approx(math.log(n))
    assert s["subkey_kl_second"] == pytest.approx(math.log(n))
    assert s["dead_subkeys"] == pytest.approx((n - 1) / n)


def test_two_point_distribution_through_tracker():
    n, N = 4, 16
    t = UsageTracker(n, heads=1, window=10**6)  # gamma ~ 1: counts are plain sums
    indices = torch.tensor([3, 3, 3, 9]).view(4, 1, 1)
    t.update(indices, torch.ones(4, 1, 1))
    s = t.summary()
    kl = math.log(N) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert s["kl_unweighted"] == pytest.approx(kl, rel=1e-5)
    assert s["usage_unweighted"] == pytest.approx(math.exp(-kl), rel=1e-5)
    # ascending: 14 zeros, then .25 (i=15) and .75 (i=16): (13*.25 + 15*.75) / 16
    assert s["gini_unweighted"] == pytest.approx((13 * 0.25 + 15 * 0.75) / 16, rel=1e-5)
    assert (s["top50"], s["top90"], s["top99"]) == (1, 2, 2)


def test_weighted_vs_unweighted_with_skewed_weights():
    n, N = 4, 16
    t = UsageTracker(n, heads=1)
    # every token reads slots 0 and 5 equally often, but slot 0 gets 0.9 of the weight;
    # the sign is dropped (identity scores can be negative)
    indices = torch.tensor([0, 5]).expand(6, 1, 2)
    weights = torch.tensor([-0.9, 0.1]).expand(6, 1, 2).clone().requires_grad_()
    t.update(indices, weights)
    s = t.summary()
    assert s["kl_unweighted"] == pytest.approx(math.log(N) - math.log(2), rel=1e-6)
    assert s["kl_weighted"] == pytest.approx(math.log(N) + 0.9 * math.log(0.9) + 0.1 * math.log(0.1), rel=1e-6)
    assert s["kl_weighted"] > s["kl_unweighted"]
    assert s["gini_weighted"] > s["gini_unweighted"]
    assert s["top50"] == 1 and s["top90"] == 2  # unweighted: two equal slots
    assert t.mass[0].item() == pytest.approx(5.4) and t.counts[0].item() == pytest.approx(6.0)
    assert weights.grad is None and not t.mass.requires_grad


def test_subkey_kl_per_half():
    n, k = 8, 8
    t = UsageTracker(n, heads=2)
    i = torch.arange(n)
    head0 = ids(i, 3, n)  # first half uniform, second half always sub-key 3
    head1 = ids(i, i, n)  # diagonal: both halves uniform
    indices = torch.stack([head0, head1]).expand(5, 2, k)
    t.update(indices, uniform_weights(indices))
    s = t.summary()
    assert s["subkey_kl_first"] == pytest.approx(0.0, abs=1e-9)
    assert s["subkey_kl_second"] == pytest.approx(math.log(n) / 2)  # mean of log n and 0
    assert t.subkey_counts[0, 1, 3].item() == pytest.approx(5 * k)
    assert t.subkey_counts[1, 1].tolist() == pytest.approx([5.0] * n)
    # dead: head 0 second half has n-1 never-used sub-keys, out of 2*2*n entries
    assert s["dead_subkeys"] == pytest.approx((n - 1) / (4 * n))


def test_dead_subkey_fraction():
    n = 8
    t = UsageTracker(n, heads=1, window=10**6, dead_threshold=0.1)
    # first half: sub-keys 0-4 read 20 times, 5 twice, 6 once, 7 never (total 103, expectation
    # 12.875, threshold 1.2875: 6 and 7 dead, 5 alive); second half: always sub-key 0 (7 dead)
    first = [s for s in range(5) for _ in range(20)] + [5, 5, 6]
    indices = ids(torch.tensor(first), 0, n).view(-1, 1, 1)
    t.update(indices, torch.ones(indices.shape))
    assert t.summary()["dead_subkeys"] == pytest.approx((2 + 7) / 16)
    t.dead_threshold = 0.2  # threshold 2.575: sub-key 5 (2 reads) now dead too
    assert t.summary()["dead_subkeys"] == pytest.approx((3 + 7) / 16)


# ---------------------------------------------------------------------------- coverage and windows


def test_coverage_matches_uniform_ideal_for_random_ids():
    n, H, k, T = 128, 4, 8, 256  # N = 16384, A = 8192 per update
    g = torch.Generator().manual_seed(0)
    t = UsageTracker(n, heads=H, window=2)
    for _ in range(5):
        indices = torch.randint(0, n * n, (T, H, k), generator=g)
        t.update(indices, torch.rand(T, H, k, generator=g))
    s = t.summary()
    assert s["coverage_ideal"] == pytest.approx(1 - math.exp(-1))  # window of 2 updates: A = N
    assert s["coverage_ratio"] == pytest.approx(1.0, abs=0.03)
    assert s["updates"] == 5 and s["tokens_seen"] == 5 * T


def test_window_drops_slots_accessed_long_ago():
    n, N, window = 4, 16, 3
    t = UsageTracker(n, heads=1, window=window)
    old, new = torch.arange(0, 4).view(1, 1, 4), torch.arange(4, 8).view(1, 1, 4)
    t.update(old, torch.ones(1, 1, 4))
    for _ in range(window - 1):
        t.update(new, torch.ones(1, 1, 4))
    assert t.summary()["coverage"] == 8 / N  # `old` is still inside the window
    t.update(new, torch.ones(1, 1, 4))
    s = t.summary()
    assert s["coverage"] == 4 / N  # `old` dropped out
    assert s["coverage_ideal"] == pytest.approx(1 - math.exp(-window * 4 / N))
    assert t.last_seen[:8].tolist() == [0] * 4 + [window] * 4
    assert t.last_seen[8:].tolist() == [-1] * 8
    # the EMA of `old` decayed by gamma per later update
    assert t.counts[0].item() == pytest.approx((1 - 1 / window) ** window)


# ---------------------------------------------------------------------------- masks


def test_masked_tokens_are_ignored():
    n, H, k = 8, 2, 4
    g = torch.Generator().manual_seed(1)
    masked, packed = UsageTracker(n, heads=H, window=4), UsageTracker(n, heads=H, window=4)
    for _ in range(6):
        indices = torch.randint(0, n * n, (3, 5, H, k), generator=g)
        weights = torch.randn(3, 5, H, k, generator=g)
        mask = torch.rand(3, 5, generator=g) > 0.4
        masked.update(indices, weights, mask)
        packed.update(indices[mask], weights[mask])  # only the real tokens
    assert_same_summary(masked.summary(), packed.summary())
    assert torch.equal(masked.last_seen, packed.last_seen)
    assert masked.summary()["tokens_seen"] == packed.summary()["tokens_seen"] < 6 * 15


def test_masked_token_does_not_mark_its_slots_seen():
    n, N = 4, 16
    t = UsageTracker(n, heads=1)
    indices = torch.tensor([[[1, 2]], [[7, 8]]])  # (2 tokens, 1 head, k=2)
    t.update(indices, torch.ones(2, 1, 2), mask=torch.tensor([True, False]))
    s = t.summary()
    assert s["coverage"] == 2 / N
    assert t.last_seen[[7, 8]].tolist() == [-1, -1] and t.counts[[7, 8]].tolist() == [0.0, 0.0]
    assert s["tokens_seen"] == 1 and s["coverage_ideal"] == pytest.approx(1 - math.exp(-2 / N))


def test_all_masked_gives_nan_not_crash():
    t = UsageTracker(4, heads=1)
    t.update(torch.zeros(3, 1, 2, dtype=torch.long), torch.ones(3, 1, 2), mask=torch.zeros(3, dtype=torch.bool))
    s = t.summary()
    assert s["coverage"] == 0.0 and s["coverage_ideal"] == 0.0 and s["updates"] == 1
    assert math.isnan(s["coverage_ratio"]) and math.isnan(s["kl_unweighted"]) and math.isnan(s["dead_subkeys"])


def test_reset():
    t = UsageTracker(4, heads=1)
    t.update(torch.zeros(3, 1, 2, dtype=torch.long), torch.ones(3, 1, 2))
    t.reset()
    assert t.counts.sum() == 0 and (t.last_seen == -1).all() and t.subkey_counts.sum() == 0
    s = t.summary()
    assert s["updates"] == 0 and s["tokens_seen"] == 0 and math.isnan(s["coverage"])


# ---------------------------------------------------------------------------- devices, state, no sync


def test_to_moves_buffers_and_state_dict_is_empty():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.usage = UsageTracker(4, heads=2)

    layer = Layer()
    assert set(layer.state_dict()) == {"proj.weight", "proj.bias"}
    assert layer.usage.state_dict() == {}
    layer.to(torch.bfloat16)  # model-wide dtype casts must not touch the EMA buffers
    assert layer.proj.weight.dtype == torch.bfloat16
    assert layer.usage.counts.dtype == layer.usage.mass.dtype == layer.usage.subkey_counts.dtype == torch.float32
    layer.to("meta")
    names = ("counts", "mass", "subkey_counts", "last_seen")
    assert all(getattr(layer.usage, b).device.type == "meta" for b in names)


def test_update_reads_no_data():
    # on the meta device any .item(), nonzero() or x[mask] raises: update must not need them
    t = UsageTracker(8, heads=2).to("meta")
    indices = torch.empty(3, 5, 2, 4, dtype=torch.long, device="meta")
    t.update(indices, torch.empty(3, 5, 2, 4, device="meta"), torch.empty(3, 5, dtype=torch.bool, device="meta"))
    t.update(indices, torch.empty(3, 5, 2, 4, device="meta"))
    assert t._step.device.type == "meta" and t._window_accesses.shape == (t.window,)


def test_state_of_older_versions_loads():
    """Before the counters moved to the device, tracker_state kept tokens and the window on the host."""
    a = UsageTracker(4, heads=1, window=3)
    for tokens in (2, 3, 4, 5):
        a.update(torch.zeros(tokens, 1, 2, dtype=torch.long), torch.ones(tokens, 1, 2))
    old = {b: getattr(a, b).clone() for b in ("counts", "mass", "subkey_counts", "last_seen", "_step")}
    old.update(_masked_tokens=torch.tensor(0), updates=4, host_tokens=14, window=[[3, 2], [4, 2], [5, 2]])
    b = UsageTracker(4, heads=1, window=3)
    b.load_tracker_state(old)
    assert b.summary() == a.summary() and b.summary()["tokens_seen"] == 14


def test_int32_indices_and_bf16_weights():
    a, b = UsageTracker(4, heads=1), UsageTracker(4, heads=1)
    indices = torch.tensor([[[1, 5]], [[5, 6]]])
    a.update(indices, torch.tensor([[[0.5, 0.25]], [[1.0, 2.0]]]))
    b.update(indices.int(), torch.tensor([[[0.5, 0.25]], [[1.0, 2.0]]], dtype=torch.bfloat16))
    assert torch.equal(a.counts, b.counts) and torch.equal(a.mass, b.mass)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_cuda_update_never_syncs():
    t = UsageTracker(64, heads=4).cuda()
    indices = torch.randint(0, 64 * 64, (2, 16, 4, 8), device="cuda")
    weights = torch.rand(2, 16, 4, 8, device="cuda", requires_grad=True)
    mask = torch.rand(2, 16, device="cuda") > 0.3
    cpu = UsageTracker(64, heads=4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.update(indices, weights, mask)
            t.update(indices, weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(3):
        cpu.update(indices.cpu(), weights.cpu(), mask.cpu())
        cpu.update(indices.cpu(), weights.cpu())
    assert_same_summary(t.summary(), cpu.summary(), rel=1e-5)


# ---------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    t = UsageTracker(4, heads=2)
    good = torch.zeros(3, 2, 4, dtype=torch.long)
    w = torch.ones(3, 2, 4)
    with pytest.raises(ValueError, match=r"heads=2"):
        t.update(torch.zeros(3, 3, 4, dtype=torch.long), torch.ones(3, 3, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., heads=2, k\)"):
        t.update(torch.zeros(6, dtype=torch.long), torch.ones(6))
    with pytest.raises(ValueError, match=r"mask shape \(2,\) must equal indices.shape\[:-2\] = \(3,\)"):
        t.update(good, w, mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor.*mask\.bool\(\)"):
        t.update(good, w, mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"weights shape \(3, 2, 3\) must equal indices shape \(3, 2, 4\)"):
        t.update(good, torch.ones(3, 2, 3))
    with pytest.raises(TypeError, match=r"indices must be int64"):
        t.update(good.float(), w)
    with pytest.raises(ValueError, match=r"one device.*\.to\(device\)"):
        t.update(good.to("meta"), w.to("meta"))
    with pytest.raises(ValueError, match=r"n_keys"):
        UsageTracker(0, heads=1)
    with pytest.raises(ValueError, match=r"window"):
        UsageTracker(4, heads=1, window=0)
    assert t.summary()["updates"] == 0  # failed calls recorded nothing


def test_tracker_state_round_trip_continues_exactly():
    """tracker_state / load_tracker_state (what training checkpoints save): a restored tracker goes on
    exactly like the original, through masked (device-scalar token counts) and unmasked updates."""
    g = torch.Generator().manual_seed(0)
    steps = [
        (torch.randint(0, 64, (5, 2, 3), generator=g), torch.rand(5, 2, 3, generator=g),
         None if t % 2 else torch.tensor([True, False, True, True, False]))
        for t in range(8)
    ]  # fmt: skip
    a = UsageTracker(8, 2, window=3)
    for inputs in steps[:5]:
        a.update(*inputs)
    b = UsageTracker(8, 2, window=3)
    b.load_tracker_state(a.tracker_state())
    for inputs in steps[5:]:
        a.update(*inputs)
        b.update(*inputs)
    for name in ("counts", "mass", "subkey_counts", "last_seen"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    sa, sb = a.summary(), b.summary()
    assert sa.keys() == sb.keys() and sa["updates"] == 8 and sa["tokens_seen"] == 4 * 5 + 4 * 3
    for k in sa:
        assert sa[k] == sb[k] or (math.isnan(sa[k]) and math.isnan(sb[k])), k
