import pytest
import torch
from conftest import DEVICES

from memlayers.ops import product_key_topk


def brute_force(q1, q2, keys1, keys2, k):
    """Score all n*n product keys; order by (score desc, flat index asc); keep k."""
    s1 = torch.einsum("thd,hnd->thn", q1, keys1)
    s2 = torch.einsum("thd,hnd->thn", q2, keys2)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (T, H, n*n), index i*n + j
    order = torch.sort(full, dim=-1, descending=True, stable=True).indices[..., :k]
    return full.gather(-1, order), order


def _random(T, H, n, h, dtype=torch.float32, device="cpu"):
    q1, q2 = torch.randn(2, T, H, h, dtype=dtype, device=device).unbind(0)
    k1, k2 = torch.randn(2, H, n, h, dtype=dtype, device=device).unbind(0)
    return q1, q2, k1, k2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,H,n,h,k", [(7, 1, 16, 4, 1), (33, 4, 50, 6, 8), (5, 2, 9, 3, 9), (64, 3, 128, 16, 32)])
def test_matches_brute_force(T, H, n, h, k, device):
    q1, q2, k1, k2 = _random(T, H, n, h, device=device)
    scores, indices = product_key_topk(q1, q2, k1, k2, k)
    ref_scores, ref_indices = brute_force(q1, q2, k1, k2, k)
    assert scores.shape == indices.shape == (T, H, k) and indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    assert torch.equal(scores, ref_scores)


def test_matches_full_key_scoring_float64():
    """Against concatenated full keys [K1[i], K2[j]] scored as one dot product."""
    T, H, n, h, k = 11, 2, 20, 5, 6
    q1, q2, k1, k2 = _random(T, H, n, h, torch.float64)
    full_keys = torch.cat([k1.unsqueeze(2).expand(H, n, n, h), k2.unsqueeze(1).expand(H, n, n, h)], -1).reshape(
        H, n * n, 2 * h
    )
    full = torch.einsum("thd,hnd->thn", torch.cat([q1, q2], -1), full_keys)
    ref = full.topk(k, dim=-1)
    scores, indices = product_key_topk(q1, q2, k1, k2, k)
    assert torch.allclose(scores, ref.values, atol=1e-12)
    assert torch.equal(indices, ref.indices)  # no ties with continuous random data


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(5))
def test_ties_lower_index_wins(seed, dtype, device):
    torch.manual_seed(seed)
    T, H, n, h, k = 40, 2, 24, 3, 10
    # Small integers: exact float sums and many ties, at the per-half boundaries and in the grid.
    q1, q2 = torch.randint(-1, 2, (2, T, H, h), device=device).to(dtype).unbind(0)
    k1, k2 = torch.randint(-1, 2, (2, H, n, h), device=device).to(dtype).unbind(0)
    scores, indices = product_key_topk(q1, q2, k1, k2, k)
    ref_scores, ref_indices = brute_force(q1, q2, k1, k2, k)
    assert torch.equal(indices, ref_indices) and torch.equal(scores, ref_scores)


def test_all_scores_equal():
    q1, q2 = torch.zeros(2, 3, 1, 4).unbind(0)
    k1, k2 = torch.randn(2, 1, 10, 4).unbind(0)
    _, indices = product_key_topk(q1, q2, k1, k2, 5)
    assert torch.equal(indices, torch.arange(5).expand(3, 1, 5))


def test_empty_batch():
    q1, q2, k1, k2 = _random(0, 2, 8, 4)
    scores, indices = product_key_topk(q1, q2, k1, k2, 3)
    assert scores.shape == indices.shape == (0, 2, 3)


def test_gradients_flow_to_queries_and_keys():
    q1, q2, k1, k2 = (t.double().requires_grad_() for t in _random(6, 2, 12, 3))
    assert torch.autograd.gradcheck(lambda *a: product_key_topk(*a, 4)[0], (q1, q2, k1, k2))


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda q1, q2, k1, k2: (q1, q2, k1, k2, 0), "k=0 must be in"),
        (lambda q1, q2, k1, k2: (q1, q2, k1, k2, 9), "k=9 must be in"),
        (lambda q1, q2, k1, k2: (q1[0], q2[0], k1, k2, 2), "must both be \\(tokens, heads, half_dim\\)"),
        (lambda q1, q2, k1, k2: (q1, q2, k1[:, :4], k2, 2), "must both be \\(heads, n, half_dim\\)"),
        (lambda q1, q2, k1, k2: (q1[..., :2], q2[..., :2], k1, k2, 2), "do not match keys"),
    ],
)
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        product_key_topk(*args(*_random(3, 2, 8, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_top_k_selection_order_matches_stable_sort(dtype):
    """The packed-key top-k orders exactly like a stable descending sort: ties, signed zeros, infinities."""
    from memlayers.ops.product_key_topk.reference import _top_k

    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-38, -1e-38, 3.0, -3.0])
    scores = special[torch.randint(0, len(special), (50, 40))].to(dtype)
    expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :17]
    assert torch.equal(_top_k(scores, 17), expected)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        product_key_topk(*_random(3, 2, 8, 4), 2, impl="cuda")


@pytest.mark.parametrize("k", [1, 2, 3, 10, 32])
def test_grid_candidates_are_the_cells_with_few_cells_ahead(k):
    from memlayers.ops.product_key_topk.reference import grid_candidates

    a, b = grid_candidates(k)
    cells = {(x, y) for x in range(k) for y in range(k) if (x + 1) * (y + 1) <= k}
    assert list(zip(a.tolist(), b.tolist())) == sorted(cells)  # each once, row by row
    assert len(a) == sum(k // r for r in range(1, k + 1))  # 119 for k = 32


def test_too_many_subkeys_for_32_bit_flat_ids():
    q1, q2, k1, k2 = _random(2, 1, 65536 + 1, 1)
    with pytest.raises(ValueError, match="flat ids i\\*n \\+ j must fit in 32 bits"):
        product_key_topk(q1, q2, k1, k2, 4)


def _top_k_of_keys(scores, k, tie=None):
    """The selection ``_top_k`` must make: topk of every score's (score, tie) key."""
    from memlayers.ops.product_key_topk.reference import _order_keys

    if tie is None:
        tie = torch.arange(scores.shape[-1]).expand(scores.shape)
    return torch.topk(_order_keys(scores, tie), k, dim=-1).indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tie", [False, True])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 5), (9, 1), (12, 4), (40, 3), (64, 16)])
def test_top_k_equals_topk_of_keys(n, k, with_tie, dtype):
    """Rows with ties at, across and above the k-th value, NaNs of both signs, infinities, signed zeros,
    continuous values; k = n and k = 1; ties broken by position or by given ids (up to 2**32 - 1)."""
    from memlayers.ops.product_key_topk.reference import _top_k

    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1.0, -1.0, 2.0])
    scores = torch.cat(
        [special[torch.randint(0, len(special), (40, n))], torch.randint(-2, 3, (40, n)).float(), torch.randn(40, n)]
    ).to(dtype)
    tie = 2**32 - 1 - 7919 * torch.rand(len(scores), n).argsort(dim=-1) if with_tie else None  # distinct, large
    assert torch.equal(_top_k(scores, k, tie), _top_k_of_keys(scores, k, tie))


def test_top_k_keys_only_the_rows_with_ties(monkeypatch):
    """Rows whose k best scores are distinct and above the rest take no keys; a row of equal scores and a row
    with a NaN are redone on keys, and come out as the keys order them."""
    from memlayers.ops.product_key_topk import reference

    scores = torch.randn(30, 40)
    tied = scores.clone()
    tied[4] = 1.0
    tied[9, 17] = float("nan")
    expected, expected_tied = _top_k_of_keys(scores, 6), _top_k_of_keys(tied, 6)
    keyed = []
    order_keys = reference._order_keys
    monkeypatch.setattr(reference, "_order_keys", lambda s, t: keyed.append(len(s)) or order_keys(s, t))
    assert torch.equal(reference._top_k(scores, 6), expected)
    assert keyed == []
    assert torch.equal(reference._top_k(tied, 6), expected_tied)
    assert keyed == [2]  # the two rows, redone
