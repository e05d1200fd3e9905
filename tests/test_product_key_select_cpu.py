"""The numba selections (``ops/product_key_topk/cpu_select.py``) against the plain-torch references: the exact
product-key selection id for id, UltraMem's Tucker selection cell for cell.

The reference itself is checked against brute force in ``test_product_key_topk.py`` (whose tests, on float32 CPU
scores, now also run this kernel through ``product_key_topk``'s default dispatch).
"""

import importlib
import sys

import numpy as np
import pytest
import torch
from conftest import count_calls, poison_allocations, rel_err, torch_threads

numba = pytest.importorskip("numba")

from memlayers.ops import product_key_topk
from memlayers.ops.dispatch import cpu_kernels, use_cpu_kernel
from memlayers.ops.product_key_topk import library
from memlayers.ops.product_key_topk.cpu_select import (
    _candidates,
    _head_major,
    _rows,
    _select,
    _select_in_parallel,
    _top_and_bottom_k_row,
    product_key_select_cpu,
    threshold_z,
    tucker_select_cpu,
)
from memlayers.ops.product_key_topk.reference import product_key_select
from memlayers.ops.product_key_topk.tucker import filter_scores, gather_sides, tucker_select

POISON = -(2**62)


def assert_same(s1, s2, k):
    """The kernel's ids equal the reference's, through the wrapper and through both kernels on a poisoned output."""
    want = product_key_select(s1, s2, k)
    assert torch.equal(product_key_select_cpu(s1, s2, k), want)
    a, b, z = _head_major(s1), _head_major(s2), threshold_z(s1.shape[-1], k)
    for chunks in (None, 1, 3):
        out = torch.full(want.shape, POISON, dtype=torch.int64)
        if chunks is None:
            _select(a, b, k, z, out.numpy(), 0, a.shape[0])
        else:
            _select_in_parallel(a, b, k, z, out.numpy(), a.shape[0], chunks)
        assert torch.equal(out, want)


@pytest.mark.parametrize(
    "T,H,n,k",
    [(1, 1, 1, 1), (7, 1, 16, 1), (33, 4, 50, 8), (5, 2, 9, 9), (64, 3, 128, 32), (300, 4, 128, 16), (20, 2, 300, 128),
     (9, 2, 1000, 33), (3, 1, 64, 64)],
)  # fmt: skip
def test_random_scores(T, H, n, k):
    assert_same(torch.randn(T, H, n), torch.randn(T, H, n), k)


@pytest.mark.parametrize("seed", range(4))
def test_ties_go_to_the_lower_id(seed):
    g = torch.Generator().manual_seed(seed)
    s1, s2 = torch.randint(-2, 3, (2, 200, 4, 40), generator=g).float().unbind(0)
    assert_same(s1, s2, 12)


@pytest.mark.parametrize("n", [30, 300])
def test_all_scores_equal(n):
    """Every row's threshold keeps every score (more than 64: the full-sort path); the lowest ids win."""
    z = torch.zeros(20, 3, n)
    assert torch.equal(product_key_select_cpu(z, -z, 7), torch.arange(7).expand(20, 3, 7))
    assert_same(z, -z, 7)


def test_signed_zeros_infinities_and_nans():
    """-0.0 ties +0.0; inf + -inf and NaN inputs of both signs rank by their bits, as in the reference."""
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-38, float("inf"), -float("inf"), float("nan"), -float("nan"), 3.0])
    s1, s2 = values[torch.randint(0, len(values), (2, 50, 4, 40), generator=g)].unbind(0)
    assert_same(s1, s2, 10)


def test_rows_the_spread_threshold_misjudges():
    """One outlier per row puts mean + z std above all but one score: the group-maxima bound takes over."""
    s1, s2 = torch.randn(2, 100, 2, 256).unbind(0)
    s1[..., 5] = 1e6
    s2[..., 200] = -1e6
    assert_same(s1, s2, 16)
    huge = torch.randn(2, 30, 2, 64) * 1e30  # squares overflow: no spread threshold at all
    assert_same(*huge.unbind(0), 8)


def test_empty_batch_and_strided_scores():
    assert product_key_select_cpu(torch.randn(0, 4, 16), torch.randn(0, 4, 16), 4).shape == (0, 4, 4)
    s1, s2 = torch.randn(2, 4, 700, 64).transpose(1, 2).unbind(0)  # (700, 4, 64), rows not contiguous
    assert not s1.is_contiguous()
    assert_same(s1, s2, 8)


def test_one_thread_and_many_give_the_same_ids():
    s1, s2 = torch.randn(2, 1500, 4, 64).unbind(0)
    with torch_threads(1):
        one = product_key_select_cpu(s1, s2, 16)
    with torch_threads(2):
        two = product_key_select_cpu(s1, s2, 16)
    assert torch.equal(one, two)
    assert torch.equal(one, product_key_select(s1, s2, 16))


def test_dispatch(monkeypatch):
    """float32 CPU scores take the kernel under impl="auto"; impl="reference", MEMLAYERS_CPU_KERNELS=0 and other
    dtypes take the reference; every way gives the same ids."""
    calls = []
    real = product_key_select_cpu
    module = sys.modules["memlayers.ops.product_key_topk.cpu_select"]  # (the package's name is also a function's)
    monkeypatch.setattr(module, "product_key_select_cpu", lambda *a: calls.append(a[0].dtype) or real(*a))
    q1, q2 = torch.randn(2, 1200, 2, 6).unbind(0)  # 72,000 scores per half: above CPU_KERNEL_MIN_ELEMENTS
    k1, k2 = torch.randn(2, 2, 30, 6).unbind(0)
    auto = product_key_topk(q1, q2, k1, k2, 5)
    assert calls == [torch.float32]
    reference = product_key_topk(q1, q2, k1, k2, 5, impl="reference")
    monkeypatch.setenv("MEMLAYERS_CPU_KERNELS", "0")
    off = product_key_topk(q1, q2, k1, k2, 5)
    monkeypatch.delenv("MEMLAYERS_CPU_KERNELS")
    product_key_topk(q1.double(), q2.double(), k1.double(), k2.double(), 5)
    product_key_topk(q1.bfloat16(), q2.bfloat16(), k1.bfloat16(), k2.bfloat16(), 5)
    assert calls == [torch.float32]
    for scores, ids in (reference, off):
        assert torch.equal(ids, auto[1]) and torch.equal(scores, auto[0])
    s1 = torch.randn(1200, 2, 30)
    assert use_cpu_kernel("auto", s1) and not use_cpu_kernel("reference", s1)
    assert not use_cpu_kernel("auto", s1.double()) and not use_cpu_kernel("auto", s1[:100])  # too few: the reference


def test_threshold_z():
    assert threshold_z(16, 8) == -float("inf")  # 1.5 k + 8 >= n: every score is kept
    z = threshold_z(1024, 32)
    assert 1.5 < z < 1.7  # ~56 of 1,024 above mean + z std


def test_numba_that_does_not_import_falls_back_to_the_reference(monkeypatch):
    cpu_kernels.cache_clear()
    monkeypatch.delattr(sys.modules["memlayers.ops.product_key_topk"], "cpu_select")
    monkeypatch.setitem(sys.modules, "memlayers.ops.product_key_topk.cpu_select", None)  # its import fails
    s1, s2 = torch.randn(2, 2000, 2, 20).unbind(0)  # above CPU_KERNEL_MIN_ELEMENTS
    try:
        with pytest.warns(
            UserWarning, match="numba is installed but the CPU kernels do not load.*MEMLAYERS_CPU_KERNELS=0"
        ):
            ids = library.select(s1, s2, 4)
    finally:
        cpu_kernels.cache_clear()
    assert torch.equal(ids, product_key_select(s1, s2, 4))


def tucker_cell_scores(s_row, s_col, core, i, j):
    """Σ_b (Σ_a S_row[a, i] core[a, b]) S_col[b, j] in float64 for the cells (i, j) (T, H, k)."""
    sr = s_row.double().gather(3, i.unsqueeze(2).expand(-1, -1, s_row.shape[2], -1))  # (T, H, r, k)
    sc = s_col.double().gather(3, j.unsqueeze(2).expand(-1, -1, s_col.shape[2], -1))
    return torch.einsum("thak,hab,thbk->thk", sr, core.double(), sc)


def assert_tucker_same(s_row, s_col, u, v, core, m, k):
    """The kernel's cells are the reference's, except in rows where the reference's own float32 sums could order
    near-ties otherwise (its grid is a matmul): there the chosen cells' scores agree to 1e-6. Both return the chosen
    cells' side scores, read from s_row and s_col."""
    want_i, want_j, want_sr, want_sc = tucker_select(s_row, s_col, u, v, core, m, k)
    got_i, got_j, got_sr, got_sc = tucker_select_cpu(s_row, s_col, u, v, core, m, k)
    for i, j, sr, sc in ((want_i, want_j, want_sr, want_sc), (got_i, got_j, got_sr, got_sc)):
        assert torch.equal(sr, gather_sides(s_row, i)) and torch.equal(sc, gather_sides(s_col, j))
    differ = ~((got_i == want_i) & (got_j == want_j)).all(-1)
    assert differ.float().mean() <= 0.01
    got, want = (tucker_cell_scores(s_row, s_col, core, i, j)[differ] for i, j in ((got_i, got_j), (want_i, want_j)))
    torch.testing.assert_close(got.sort(-1).values, want.sort(-1).values, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "T,H,n,r,m,k", [(300, 2, 256, 2, 16, 16), (200, 1, 112, 2, 16, 16), (50, 3, 20, 3, 5, 4), (40, 2, 8, 2, 8, 4),
                    (30, 2, 12, 1, 7, 3), (20, 2, 9, 2, 6, 6), (3, 1, 1, 1, 1, 1)],
)  # fmt: skip
def test_tucker_random_scores(T, H, n, r, m, k, monkeypatch):
    """Both blocks (m < n; with n < 2m the bottom block overlaps the top one), one block (m = n), rank 1 to 3; every
    output written (allocations poisoned)."""
    s_row, s_col = torch.randn(2, T, H, r, n).unbind(0)
    u, v = torch.randn(2, H, r).unbind(0)
    poison_allocations(monkeypatch, int_fill=POISON)
    assert_tucker_same(s_row, s_col, u, v, torch.randn(H, r, r), m, k)


def test_tucker_filter_scores_choose_the_candidates():
    """With m = k, every chosen row and column is among the top (or bottom) m by ``u·S_row``, ``v·S_col``: the
    kernel's filter scores are the reference's (each row's top-m sets equal, ties aside)."""
    s_row, s_col = torch.randn(2, 100, 2, 2, 64).unbind(0)
    u, v = torch.randn(2, 2, 2).unbind(0)
    i, j, _, _ = tucker_select_cpu(s_row, s_col, u, v, torch.randn(2, 2, 2), 6, 6)
    for chosen, s, w in ((i, s_row, u), (j, s_col, v)):
        a = filter_scores(s, w)  # (T, H, n)
        allowed = torch.cat([a.topk(6, -1).indices, a.topk(6, -1, largest=False).indices], -1)
        assert (chosen.unsqueeze(-1) == allowed.unsqueeze(-2)).any(-1).all()


def test_tucker_empty_batch_strided_scores_and_threads():
    u, v, core = torch.randn(2, 2), torch.randn(2, 2), torch.randn(2, 2, 2)
    i, j, sr, sc = tucker_select_cpu(torch.randn(0, 2, 2, 16), torch.randn(0, 2, 2, 16), u, v, core, 4, 4)
    assert i.shape == j.shape == (0, 2, 4) and sr.shape == sc.shape == (0, 2, 2, 4)
    layouts = [
        (torch.randn(2, 600, 2, 2, 64).transpose(0, 1)[:, 1], torch.randn(600, 2, 2, 64)),  # strided, storage offset
        (torch.randn(2, 2, 600, 64).permute(2, 0, 1, 3),) * 2,  # (H, r, T, n) in memory, as a per-rank einsum's
        (torch.randn(600, 1, 2, 64).expand(600, 2, 2, 64), torch.randn(600, 2, 2, 128)[..., ::2]),  # stride 0 or 2
    ]
    for s_row, s_col in layouts:
        with torch_threads(1):
            one = tucker_select_cpu(s_row, s_col, u, v, core, 8, 8)
        two = tucker_select_cpu(s_row, s_col, u, v, core, 8, 8)
        assert all(torch.equal(x, y) for x, y in zip(one, two))
        assert_tucker_same(s_row, s_col, u, v, core, 8, 8)


def test_wrappers_refuse_what_the_kernels_cannot_read():
    s = torch.randn(5, 2, 2, 10)
    u, core = torch.randn(2, 2), torch.randn(2, 2, 2)
    for m, k in ((11, 4), (4, 5), (4, 0)):
        with pytest.raises(ValueError, match="1 <= k <= m <= n"):
            tucker_select_cpu(s, s, u, u, core, m, k)
    with pytest.raises(ValueError, match="1 <= k <= m <= n"):
        tucker_select_cpu(s, s, u, u[:1], core, 4, 4)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        product_key_select_cpu(s[:, :, 0], s[:, :, 0], 11)


@numba.njit
def _top_and_bottom(x, k, z, top, bottom):
    keys = np.empty(2 * x.shape[1], np.int64)
    keys_low = np.empty(2 * x.shape[1], np.int64)
    for r in range(x.shape[0]):
        _top_and_bottom_k_row(x[r], k, z, keys, keys_low, top[r], bottom[r])


def ordered_keys(x):
    """float32 -> int64 in float order, -0.0 tying +0.0 and NaN above inf (what the kernels rank by)."""
    bits = (x + 0.0).view(torch.int32).long()
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@pytest.mark.parametrize("n,k", [(112, 16), (256, 16), (20, 5), (9, 9), (300, 80)])
def test_tucker_rows_top_and_bottom_k(n, k):
    """The Tucker kernel's one-pass top and bottom k of each side: a stable sort's first k, descending and ascending
    (ties to the lower position), on normal rows, rows of ties, signed zeros, infinities and NaNs (above inf, as in
    torch's sorts), and rows with an outlier (the fallback bound)."""
    g = torch.Generator().manual_seed(n)
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), -float("inf"), float("nan")])
    ties = values[torch.randint(0, len(values), (40, n), generator=g)]
    outliers = torch.randn(40, n, generator=g)
    outliers[:20, 3], outliers[20:, -1] = 1e6, -1e6
    x = torch.cat([torch.randn(40, n, generator=g), ties, outliers, torch.zeros(3, n)])
    top, bottom = (torch.full((x.shape[0], k), POISON, dtype=torch.int64) for _ in range(2))
    _top_and_bottom(x.numpy(), k, threshold_z(n, k), top.numpy(), bottom.numpy())
    for got, descending in ((top, True), (bottom, False)):
        want = ordered_keys(x).sort(dim=-1, descending=descending, stable=True).indices[:, :k]
        assert torch.equal(got, want)


@numba.njit
def _side_candidates(s, strides, w, n, m, z, chosen):
    keys, keys_low, side = np.empty(2 * n, np.int64), np.empty(2 * n, np.int64), np.empty(n, np.float32)
    for t in range(chosen.shape[0]):
        _candidates(s, strides, w, t, 0, m, z, side, keys, keys_low, chosen[t, 0])


def test_tucker_nan_filter_scores_rank_as_torch_topk_ranks_them():
    """inf - inf makes a NaN whose sign bit is set; the kernel ranks every NaN filter score first among the top m and
    last among the bottom m, as torch's topk does (the reference's choice), and ties to the lower position."""
    g = torch.Generator().manual_seed(3)
    n, m = 40, 6
    s = torch.randn(30, 1, 2, n, generator=g)
    s[:10, :, 0, 5], s[:10, :, 1, 5] = float("inf"), float("inf")  # u = (1, -1): inf - inf
    s[10:20, :, 0, 7] = float("-inf")  # -inf filter score
    s[20:, :, :, 9] = float("nan")
    w = torch.tensor([[1.0, -1.0]])
    chosen = torch.full((30, 1, 2 * m), POISON, dtype=torch.int64)
    flat, strides = _rows(s)
    _side_candidates(flat, strides, w.numpy(), n, m, threshold_z(n, m), chosen.numpy())
    x = filter_scores(s, w)[:, 0]  # (30, n)
    x = torch.where(x.isnan(), float("nan"), x)  # every NaN +NaN: what torch's sorts rank largest
    top = ordered_keys(x).sort(dim=-1, descending=True, stable=True).indices[:, :m]
    bottom = ordered_keys(x).sort(dim=-1, stable=True).indices[:, :m]
    assert torch.equal(chosen[:, 0, :m], top) and torch.equal(chosen[:, 0, m : 2 * m], bottom)
    assert x[:10, 5].isnan().all() and (top[:10, 0] == 5).all() and not (bottom[:10] == 5).any()


def test_tucker_dispatch(monkeypatch):
    """The Tucker addressing's selection: float32 CPU through the kernel, MEMLAYERS_CPU_KERNELS=0 through the
    reference; the layer's ids agree."""
    import memlayers

    layer = memlayers.MemoryLayer.from_preset("ultramem", 32, n_keys=16, topk=4, heads=2).eval()
    x = torch.randn(2100, 32)  # 134,400 side scores: above CPU_KERNEL_MIN_ELEMENTS
    calls = count_calls(monkeypatch, "memlayers.ops.product_key_topk.cpu_select", "tucker_select_cpu")
    ids = layer.addressing(x)[0]
    assert calls == [1]
    monkeypatch.setenv("MEMLAYERS_CPU_KERNELS", "0")
    assert torch.equal(layer.addressing(x)[0], ids) and calls == [1]


@pytest.mark.parametrize("T,H,n,k", [(50, 3, 40, 8), (20, 2, 128, 32), (9, 1, 7, 7)])
def test_matches_brute_force(T, H, n, k):
    """Against every one of the n*n sums, ranked by (sum descending, flat id ascending)."""
    s1, s2 = torch.randn(2, T, H, n).unbind(0)
    sums = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (T, H, n*n), the same float32 sums
    order = torch.sort(sums, dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(product_key_select_cpu(s1, s2, k), order)


@pytest.mark.parametrize("preset", ["ultramem", "ultramem_v2"])
def test_tucker_layers_train_alike_with_and_without_the_kernels(preset, monkeypatch):
    """A whole UltraMem layer above the kernels' size threshold (selection, cell scores, their gradients, the values'
    bags, the usage statistics): the output and every gradient within float32 rounding of the references'."""
    import memlayers

    torch.manual_seed(0)
    layer = memlayers.MemoryLayer.from_preset(preset, 32, n_keys=16, topk=4, heads=2).train()
    x, g = torch.randn(2, 2100, 32).unbind(0)  # 134,400 side scores: above CPU_KERNEL_MIN_ELEMENTS
    kernels = [("product_key_topk.cpu_select", "tucker_select_cpu"), ("tucker_cells.cpu_cells", "cell_scores_cpu"),
               ("tucker_cells.cpu_cells", "cell_scores_backward_cpu"), ("usage_update.cpu_usage", "usage_update_cpu"),
               ("tucker_cells.cpu_cells", "side_scores_backward_cpu")]  # fmt: skip
    calls = [
        count_calls(monkeypatch, importlib.import_module(f"memlayers.ops.{m}").__name__, name) for m, name in kernels
    ]
    runs = []
    for env in ("1", "0"):
        monkeypatch.setenv("MEMLAYERS_CPU_KERNELS", env)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        out = layer(x.requires_grad_())
        grads = torch.autograd.grad((out * g).sum(), [x, *layer.parameters()])
        runs.append((out, *grads, layer.usage.counts.clone(), layer.usage.mass.clone()))
        layer.load_state_dict(state)  # the filter refresh moved (u, v): both runs start alike
        layer.usage.reset()
    assert all(len(c) >= 1 for c in calls)  # every kernel ran with MEMLAYERS_CPU_KERNELS=1
    for a, b in zip(*runs):
        assert rel_err(a, b) < 1e-5
