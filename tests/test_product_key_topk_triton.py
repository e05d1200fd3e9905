"""Fused Triton product-key selection against the torch reference, index for index and score for score.

Without a GPU the kernel runs on CPU under ``TRITON_INTERPRET=1`` (with many rows per program and our
own copy of the bitonic top-k network, which the interpreter runs fast; ``tl.topk`` itself is checked
on small cases). With a GPU (and TRITON_INTERPRET unset) the same tests run the compiled kernel on CUDA
with its default configuration, and the configurations the benchmark sweeps.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import TRITON_DEVICE as DEVICE

from memlayers.ops.product_key_topk.reference import product_key_topk as reference
from memlayers.ops.product_key_topk.triton_select import product_key_select_triton, product_key_topk_triton

POISON = -(2**62)  # in no valid index range


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Buffers the wrappers allocate with torch.empty start as NaN (floats) or POISON (integers)."""
    empty = torch.empty

    def poisoned(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan") if t.is_floating_point() else POISON)

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
    (2, 2, 128, 4, 64),  # the largest k
    (4, 2, 77, 4, 37),  # k just above a power of two
    (3, 2, 1, 2, 1),  # n = 1
    (70, 1, 32, 4, 4),  # rows not a multiple of rows per program
]


@pytest.mark.parametrize("T,H,n,h,k", SHAPES)
def test_random_matches_reference(T, H, n, h, k):
    assert_same(random_inputs(T, H, n, h, seed=T * n + k), k)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,k", [(24, 10), (50, 7), (16, 16)])
def test_ties_lower_index_wins(seed, n, k):
    """Small integers: exact sums and ties everywhere, at each half's boundary and in the grid."""
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


def test_all_scores_equal_and_zeros():
    inputs = special_inputs([0.0, -0.0], H=8, n=30, seed=0)
    scores, indices = product_key_topk_triton(*inputs, 7)
    assert torch.equal(indices.cpu(), torch.tensor([0, 1, 2, 3, 4, 5, 6]).expand(1, 8, 7))
    assert_same(inputs, 7)  # no absorption: every sum is exact


def test_inf_minus_inf_nan_sums():
    """inf + -inf = NaN in the grid: ranked by its bits exactly as the reference ranks it (same device)."""
    inputs = special_inputs([float("inf"), -float("inf"), 2.0, -0.0], H=16, n=20, seed=1)
    assert_same(inputs, 6, check_brute_force=False)


def test_bfloat16_scores():
    """bf16 queries and keys: bf16 scores and bf16 grid sums, rounded as the reference rounds them."""
    assert_same(random_inputs(20, 3, 64, 8, torch.bfloat16, seed=3), 16, check_brute_force=False)
    g = torch.Generator().manual_seed(4)  # bf16 ties: sums of few-bit values
    q1, q2 = torch.randint(-3, 4, (2, 30, 2, 4), generator=g).to(DEVICE, torch.bfloat16).unbind(0)
    k1, k2 = (torch.randint(-3, 4, (2, 2, 40, 4), generator=g) * 37.0).to(DEVICE, torch.bfloat16).unbind(0)
    assert_same((q1, q2, k1, k2), 9, check_brute_force=False)


def test_float64_falls_back_to_reference():
    assert_same(random_inputs(6, 2, 20, 5, torch.float64), 6)


def test_empty_batch():
    scores, indices = product_key_topk_triton(*random_inputs(0, 2, 8, 4), 3)
    assert scores.shape == indices.shape == (0, 2, 3)


def test_gradients_equal_reference():
    inputs = random_inputs(12, 3, 40, 6, seed=5)
    grad = torch.randn(12, 3, 5, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    grads = []
    for fn in (product_key_topk_triton, reference):
        leaves = [x.clone().requires_grad_() for x in inputs]
        scores, _ = fn(*leaves, 5)
        grads.append(torch.autograd.grad(scores, leaves, grad))
    for ours, ref in zip(*grads):
        assert torch.equal(ours, ref)


def test_strided_scores():
    """Scores with any strides (unit last) are read in place: a (H, T, n) buffer seen as (T, H, n)."""
    g = torch.Generator().manual_seed(7)
    s1, s2 = torch.randn(2, 3, 11, 60, generator=g).to(DEVICE).transpose(1, 2).unbind(0)  # (T=11, H=3, n=60)
    wide = torch.randn(11, 3, 90, generator=g).to(DEVICE)[..., 5:65]  # row stride 90, offset 5
    for a, b in ((s1, s2), (wide, s1)):
        expected = product_key_select_triton(a.contiguous(), b.contiguous(), 13)
        assert torch.equal(product_key_select_triton(a, b, 13), expected)


CONFIGS = [
    {"ROWS": 1, "num_warps": 1, "TL_TOPK": True},  # Triton's tl.topk
    {"ROWS": 4, "num_warps": 2, "TL_TOPK": True},
    {"ROWS": 1, "num_warps": 4, "TL_TOPK": False},  # our network, one row per program
    {"ROWS": 2, "num_warps": 8, "TL_TOPK": False},
]
SMALL = [(3, 2, 20, 4, 5), (2, 1, 8, 3, 2), (5, 1, 3, 2, 1)]  # T, H, n, h, k


@pytest.mark.parametrize(
    "config,shape",
    [(c, s) for c in CONFIGS for s in SMALL] + [(CONFIGS[2], (2, 1, 1024, 4, 32))],
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
