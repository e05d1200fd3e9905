"""Fused Triton product-key selection against the torch reference, index for index and score for score.

Without a GPU the kernel runs on CPU under ``TRITON_INTERPRET=1`` (with many rows per program and our
own copy of the bitonic top-k network, which the interpreter runs fast; ``tl.topk`` itself and one row
per program are checked on small cases). With a GPU (and TRITON_INTERPRET unset) the same tests run the
compiled kernel on CUDA with its default configuration, and the configurations the benchmark sweeps.
The backward (``backward.py``, plain torch) is checked against the reference's autograd.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import TOL, rel_err
from conftest import TRITON_DEVICE as DEVICE

from memlayers.ops.product_key_topk import K_MAX, N_MAX, product_key_topk, triton_unsupported
from memlayers.ops.product_key_topk.backward import selected_scores
from memlayers.ops.product_key_topk.reference import product_key_topk as reference
from memlayers.ops.product_key_topk.triton_select import (
    SWEEP_CONFIGS,
    kernel_constexprs,
    product_key_select_triton,
    product_key_topk_triton,
)

POISON = -(2**62)  # in no valid index range


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Buffers the wrappers allocate with torch.empty (outputs and scratch) start as NaN (floats), POISON
    (int64) or the smallest value (other integers)."""
    empty = torch.empty

    def poisoned(*a, **k):
        t = empty(*a, **k)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(POISON if t.dtype == torch.int64 else torch.iinfo(t.dtype).min)

    monkeypatch.setattr(torch, "empty", poisoned)


def brute_force_indices(q1, q2, keys1, keys2, k):
    """All n*n sums, ordered by (score desc, flat index asc)."""
    s1 = torch.einsum("thd,hnd->thn", q1, keys1)
    s2 = torch.einsum("thd,hnd->thn", q2, keys2)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    return torch.sort(full, dim=-1, descending=True, stable=True).indices[..., :k]


def random_inputs(T, H, n, h, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1, q2 = torch.randn(2, T, H, h, generator=g).to(DEVICE, dtype).unbind(0)
    k1, k2 = torch.randn(2, H, n, h, generator=g).to(DEVICE, dtype).unbind(0)
    return q1, q2, k1, k2


def assert_same(inputs, k, config=None, check_brute_force=True):
    scores, indices = product_key_topk_triton(*inputs, k, config=config)
    ref_scores, ref_indices = reference(*inputs, k)
    T, H = inputs[0].shape[:2]
    n = inputs[2].shape[1]
    assert scores.shape == indices.shape == (T, H, k) and indices.dtype == torch.int64
    assert scores.dtype == ref_scores.dtype
    assert ((indices >= 0) & (indices < n * n)).all(), "an index was never written (or is out of range)"
    assert torch.equal(indices, ref_indices), f"{(indices != ref_indices).sum().item()} indices differ"
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0, equal_nan=True)
    if check_brute_force:
        assert torch.equal(indices, brute_force_indices(*inputs, k))


SHAPES = [  # T, H, n, h, k
    (7, 1, 16, 4, 1),  # k = 1
    (33, 4, 50, 6, 8),  # odd n
    (5, 2, 9, 3, 9),  # k = n, odd
    (3, 2, 1024, 8, 32),  # the paper's n and k
    (9, 3, 100, 5, 5),  # odd k
    (2, 2, 128, 4, 64),  # whole rows sorted (no room to filter), grid filtered
    (2, 1, 300, 4, 128),  # the largest k
    (1, 2, N_MAX - 3, 2, 20),  # the largest n (padded to 4096)
    (4, 2, 77, 4, 37),  # k just above a power of two
    (3, 2, 1, 2, 1),  # n = 1
    (70, 1, 32, 4, 4),  # rows not a multiple of rows per program
]


@pytest.mark.parametrize("T,H,n,h,k", SHAPES)
def test_random_matches_reference(T, H, n, h, k):
    assert_same(random_inputs(T, H, n, h, seed=T * n + k), k)


@pytest.mark.parametrize("n,k,seed", [(24, 10, 0), (24, 10, 1), (50, 7, 0), (50, 7, 1), (16, 16, 0), (700, 40, 0)])
def test_ties_lower_index_wins(n, k, seed):
    """Small integers: exact sums and ties everywhere, at each half's boundary (more ties at the k-th
    value than the filter keeps) and in the grid."""
    g = torch.Generator().manual_seed(seed)
    T, H, h = 40, 2, 3
    q1, q2 = torch.randint(-1, 2, (2, T, H, h), generator=g).float().to(DEVICE).unbind(0)
    k1, k2 = torch.randint(-1, 2, (2, H, n, h), generator=g).float().to(DEVICE).unbind(0)
    assert_same((q1, q2, k1, k2), k)


def special_inputs(values, H, n, seed):
    """h = 1 and queries 1: the scores are the sub-keys themselves, drawn from ``values``."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor(values)
    k1, k2 = values[torch.randint(0, len(values), (2, H, n, 1), generator=g)].to(DEVICE).unbind(0)
    q1, q2 = torch.ones(2, 1, H, 1, device=DEVICE).unbind(0)
    return q1, q2, k1, k2


@pytest.mark.parametrize("seed", range(3))
def test_signed_zeros_and_infinities(seed):
    """-0.0 ties +0.0; +inf and -inf in one half (no inf - inf sums); finite values of both signs.

    Not checked against brute force: sums that absorb a term (inf + x, 1 + 1e-38) tie values that differ
    in the other half, and then the reference (whose order we match) keeps the other half's top k
    where brute force keeps the lowest flat ids.
    """
    inputs = special_inputs([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 3.0], H=32, n=40, seed=seed)
    inputs = (*inputs[:2], inputs[2].clone(), inputs[3])
    inputs[2][inputs[2] == 3.0] = float("inf")
    inputs[2][inputs[2] == 1.0] = -float("inf")
    assert_same(inputs, 12, check_brute_force=False)


@pytest.mark.parametrize("n", [30, 300])
def test_all_scores_equal_and_zeros(n):
    """Every score ties: the filter keeps the lowest ids of the one value."""
    inputs = special_inputs([0.0, -0.0], H=8, n=n, seed=0)
    _, indices = product_key_topk_triton(*inputs, 7)
    assert torch.equal(indices.cpu(), torch.tensor([0, 1, 2, 3, 4, 5, 6]).expand(1, 8, 7))
    assert_same(inputs, 7)  # no absorption: every sum is exact


def test_inf_minus_inf_nan_sums():
    """inf + -inf = NaN in the grid: ranked by its bits exactly as the reference ranks it (same device)."""
    inputs = special_inputs([float("inf"), -float("inf"), 2.0, -0.0], H=16, n=20, seed=1)
    assert_same(inputs, 6, check_brute_force=False)


def test_bfloat16_scores():
    """bf16 queries and keys: bf16 scores and bf16 grid sums, rounded as the reference rounds them."""
    assert_same(random_inputs(20, 3, 64, 8, torch.bfloat16, seed=3), 16, check_brute_force=False)
    assert_same(random_inputs(4, 2, 1000, 8, torch.bfloat16, seed=4), 32, check_brute_force=False)
    g = torch.Generator().manual_seed(4)  # bf16 ties: sums of few-bit values
    q1, q2 = torch.randint(-3, 4, (2, 30, 2, 4), generator=g).to(DEVICE, torch.bfloat16).unbind(0)
    k1, k2 = (torch.randint(-3, 4, (2, 2, 40, 4), generator=g) * 37.0).to(DEVICE, torch.bfloat16).unbind(0)
    assert_same((q1, q2, k1, k2), 9, check_brute_force=False)


def test_float64_falls_back_to_reference():
    assert_same(random_inputs(6, 2, 20, 5, torch.float64), 6)


def test_empty_batch():
    scores, indices = product_key_topk_triton(*random_inputs(0, 2, 8, 4), 3)
    assert scores.shape == indices.shape == (0, 2, 3)


def test_strided_scores():
    """Scores with any strides (unit last) are read in place: a (H, T, n) buffer seen as (T, H, n)."""
    g = torch.Generator().manual_seed(7)
    s1, s2 = torch.randn(2, 3, 11, 60, generator=g).to(DEVICE).transpose(1, 2).unbind(0)  # (T=11, H=3, n=60)
    wide = torch.randn(11, 3, 90, generator=g).to(DEVICE)[..., 5:65]  # row stride 90, offset 5
    for a, b in ((s1, s2), (wide, s1)):
        expected = product_key_select_triton(a.contiguous(), b.contiguous(), 13)
        assert torch.equal(product_key_select_triton(a, b, 13), expected)


INTERPRETED = [
    {"ROWS": 16, "num_warps": 1, "TL_TOPK": False, "FILTER": False},  # whole-row sorts
    {"ROWS": 1, "num_warps": 1, "TL_TOPK": False, "FILTER": True},  # one row per program, as on CUDA
    {"ROWS": 4, "num_warps": 2, "TL_TOPK": True, "FILTER": True},  # Triton's tl.topk
]
CONFIGS = INTERPRETED if DEVICE == "cpu" else INTERPRETED + SWEEP_CONFIGS
SMALL = [(3, 2, 20, 4, 5), (2, 1, 8, 3, 2), (1, 2, 200, 2, 17)]  # T, H, n, h, k


@pytest.mark.parametrize(
    "config,shape",
    [(c, s) for c in CONFIGS for s in SMALL] + [(c, (2, 1, 1024, 4, 32)) for c in CONFIGS[:2]],
    ids=lambda x: "-".join(f"{k}{v}" for k, v in x.items()) if isinstance(x, dict) else "x".join(map(str, x)),
)
def test_configurations(config, shape):
    """Other configurations (the benchmark times more, and checks them, at n=1024 on the GPU)."""
    T, H, n, h, k = shape
    assert_same(random_inputs(T, H, n, h, seed=n + k), k, config=config)


def test_bad_scores():
    s = torch.randn(2, 3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="k=11 must be in"):
        product_key_select_triton(s, s, 11)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        product_key_select_triton(s.double(), s.double(), 3)
    with pytest.raises(ValueError, match="must be \\(T, H, n\\)"):
        product_key_select_triton(s, s[0], 3)
    big = torch.zeros(1, 1, N_MAX + 1, device=DEVICE)
    with pytest.raises(ValueError, match=f"n <= {N_MAX} sub-keys per half, got n={N_MAX + 1}"):
        product_key_select_triton(big, big, 3)
    with pytest.raises(ValueError, match=f"k <= {K_MAX}, got k={K_MAX + 1}"):
        product_key_select_triton(big[..., :300], big[..., :300], K_MAX + 1)
    with pytest.raises(ValueError, match="config needs keys"):
        product_key_select_triton(s, s, 3, {"ROWS": 3, "num_warps": 1, "TL_TOPK": False, "FILTER": True})
    with pytest.raises(ValueError, match="config needs keys"):
        product_key_select_triton(s, s, 3, {"ROWS": 1, "num_warps": 1, "TL_TOPK": False})


def test_supported_range_and_dispatch():
    """Outside the kernel's range the dispatcher names why: impl="triton" refuses, "auto" uses the reference."""
    assert triton_unsupported(N_MAX, K_MAX, torch.bfloat16) is None
    assert triton_unsupported(1, 1, torch.float32) is None
    assert "n <= 4096" in triton_unsupported(N_MAX + 1, 8, torch.float32)
    assert "k <= 128" in triton_unsupported(300, K_MAX + 1, torch.float32)
    assert "float16" in triton_unsupported(64, 8, torch.float16)
    inputs = random_inputs(3, 1, 300, 4, seed=9)
    with pytest.raises(ValueError, match="impl='triton' cannot run: the selection kernel takes k <= 128"):
        product_key_topk(*inputs, 129, impl="triton")
    _, indices = product_key_topk(*inputs, 129)  # auto: the reference
    assert torch.equal(indices, reference(*inputs, 129)[1])


def test_sizes_cover_the_range():
    """Padded sizes: rows and top lists powers of two covering n and k, grid candidates covering C(k)."""
    for n, k in [(1, 1), (9, 9), (128, 8), (129, 9), (1000, 32), (1024, 33), (N_MAX, K_MAX)]:
        sizes = kernel_constexprs(n, k, {"FILTER": True})
        assert 2 ** sizes["LOG_N"] >= max(n, 2 ** sizes["LOG_K"]) and 2 ** sizes["LOG_K"] >= k
        assert 2 ** sizes["LOG_C"] >= sum(k // r for r in range(1, k + 1))
        assert sizes["LOG_CAP"] == sizes["LOG_K"] + 1
        unfiltered = kernel_constexprs(n, k, {"FILTER": False})
        assert unfiltered["LOG_CAP"] >= max(unfiltered["LOG_N"], unfiltered["LOG_C"])


def grads(fn, inputs, k, grad):
    leaves = [x.clone().requires_grad_() for x in inputs]
    scores, indices = fn(*leaves, k)
    return scores, indices, torch.autograd.grad(scores, leaves, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,n,h,k", [(12, 3, 40, 6, 5), (0, 2, 16, 4, 3), (5, 2, 300, 8, 32)])
def test_gradients_equal_reference(T, H, n, h, k, dtype):
    """Gathers + bags (backward.py) against autograd through the reference's dense score gradients;
    the selected sub-key ids repeat within a row (one i with several j), so rows of dK get several adds."""
    inputs = random_inputs(T, H, n, h, dtype, seed=5)
    grad = torch.randn(T, H, k, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    ours = grads(product_key_topk_triton, inputs, k, grad)
    ref = grads(reference, inputs, k, grad)
    assert torch.equal(ours[1], ref[1])
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
    if T:
        assert (ours[1] // n).unique().numel() < ours[1].numel()  # repeated sub-key ids
    for a, b in zip(ours[2], ref[2]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < TOL[dtype] if T else not a.any()


def test_selected_scores_on_cpu_with_repeated_ids():
    """backward.py is torch code: on CPU, ids repeated within and across rows, fp32 and float64."""
    g = torch.Generator().manual_seed(8)
    T, H, n, h, k = 6, 2, 5, 3, 7
    for dtype in (torch.float32, torch.float64):
        q1, q2 = torch.randn(2, T, H, h, generator=g, dtype=dtype).unbind(0)
        k1, k2 = torch.randn(2, H, n, h, generator=g, dtype=dtype).unbind(0)
        i, j = torch.randint(0, n, (2, T, H, k), generator=g).unbind(0)  # repeats: k > n
        upstream = torch.randn(T, H, k, generator=g, dtype=dtype)
        leaves = [x.clone().requires_grad_() for x in (q1, q2, k1, k2)]
        s1 = torch.einsum("thd,hnd->thn", leaves[0], leaves[2])
        s2 = torch.einsum("thd,hnd->thn", leaves[1], leaves[3])
        expected = torch.autograd.grad(s1.gather(-1, i) + s2.gather(-1, j), leaves, upstream)
        leaves = [x.clone().requires_grad_() for x in (q1, q2, k1, k2)]
        scores = selected_scores(*leaves, s1.detach(), s2.detach(), i, j)
        assert torch.equal(scores, (s1.gather(-1, i) + s2.gather(-1, j)).detach())
        for a, b in zip(torch.autograd.grad(scores, leaves, upstream), expected):
            assert rel_err(a, b) < TOL[dtype]
        only_q = selected_scores(leaves[0], q2, k1, k2, s1.detach(), s2.detach(), i, j)  # grads where asked
        (dq1,) = torch.autograd.grad(only_q, [leaves[0]], upstream)
        assert rel_err(dq1, expected[0]) < TOL[dtype]


def test_product_keys_bfloat16_scores():
    """ProductKeys(score_dtype="bfloat16"): the exact top k of the bf16 scores (those the selection
    sees: bf16 halves, bf16 sums), float32 weights, gradients to the float32 parameters; "full" as before."""
    from memlayers.memory.addressing.product_keys import ProductKeys

    torch.manual_seed(0)
    full = ProductKeys(16, 40, 2, 6, 8)
    bf16 = ProductKeys(16, 40, 2, 6, 8, score_dtype="bfloat16")
    bf16.load_state_dict(full.state_dict())
    x = torch.randn(9, 16)
    ids, weights = bf16(x)
    q1, q2 = bf16.query(x).view(9, 2, 2, 4).unbind(2)
    keys = bf16.keys.detach().bfloat16()
    ref_scores, ref_ids = reference(q1.detach().bfloat16(), q2.detach().bfloat16(), keys[:, 0], keys[:, 1], 6)
    assert torch.equal(ids, ref_ids) and weights.dtype == torch.float32
    assert torch.equal(weights, ref_scores.float().softmax(-1))
    weights.square().sum().backward()
    assert bf16.keys.grad.dtype == torch.float32 and bf16.keys.grad.abs().sum() > 0
    assert torch.equal(
        full(x)[0], reference(*full.query(x).view(9, 2, 2, 4).unbind(2), full.keys[:, 0], full.keys[:, 1], 6)[1]
    )
    assert "score_dtype='bfloat16'" in repr(bf16) and "score_dtype" not in repr(full)
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        ProductKeys(16, 40, 2, 6, 8, score_dtype="float16")
