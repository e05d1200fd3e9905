"""TuckerProductKeys (UltraMem's TDQKR + MCS) against brute-force scoring of all n² slots with the full cores."""

import pytest
import torch
import torch.nn.functional as F

from memlayers.memory.addressing.product_keys import apply_score_fn, score_fn_flops
from memlayers.memory.addressing.tucker import TuckerProductKeys, expected_top_mean


def set_cores(a: TuckerProductKeys, cores: torch.Tensor) -> None:
    """Give ``a`` these cores and the filter their (sum's) leading singular pair."""
    with torch.no_grad():
        a.cores.copy_(cores)
        u, v = a.leading_pair(torch.ones_like(a.u), squarings=9)
        a.u.copy_(u)
        a.v.copy_(v)


def rank1_cores(C: int, H: int, r: int, g: torch.Generator) -> torch.Tensor:
    """(C, H, r, r) cores whose sum over C is rank 1 per head with a positive singular value."""
    x, y = torch.randn(H, r, 1, generator=g), torch.randn(H, 1, r, generator=g)
    return torch.rand(C, 1, 1, 1, generator=g).add(0.1) * (x @ y)


def reference(a: TuckerProductKeys, x: torch.Tensor):
    """Independent scoring of all n² slots: (full per-core grid (T, H, C, n*n), the k best ids under the sum
    of the cores (T, H, k))."""
    T, H, half = x.shape[0], a.heads, a.key_dim // 2
    qn, kn = a.query_norm, a.key_norm
    q = F.layer_norm(
        F.linear(x, a.query.weight, a.query.bias).view(T, H, a.query_ranks, 2, half), (half,), qn.weight, qn.bias
    )
    keys = F.layer_norm(a.keys, (half,), kn.weight, kn.bias)  # (H, 2, r, n, half)
    q = q.expand(T, H, a.rank, 2, half)
    s_row = torch.einsum("thad,haid->thai", q[:, :, :, 0], keys[:, 0])
    s_col = torch.einsum("thad,haid->thai", q[:, :, :, 1], keys[:, 1])
    grid = torch.einsum("thai,chab,thbj->thcij", s_row, a.cores, s_col).flatten(3)  # (T, H, C, n*n)
    return grid, grid.sum(2).topk(a.topk, dim=-1).indices


def recall(ids: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of the reference top-k ids (T, H, k) that ``ids`` holds."""
    return (ref.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).double().mean().item()


@pytest.mark.parametrize("n, k, heads, query_per_rank", [(8, 3, 2, False), (11, 4, 1, True), (16, 5, 3, False)])
@pytest.mark.parametrize("rank, cores", [(1, 1), (2, 2), (3, 2)])
def test_rank1_core_is_exact(n, k, heads, query_per_rank, rank, cores):
    g = torch.Generator().manual_seed(n * 100 + rank * 10 + cores)
    a = TuckerProductKeys(12, n, heads, k, 6, rank, cores, query_per_rank=query_per_rank).double().eval()
    set_cores(a, rank1_cores(cores, heads, rank, g).double())
    x = torch.randn(64, 12, generator=g, dtype=torch.float64)
    ids, _ = a(x)
    grid, ref = reference(a, x)
    kth = grid.sum(2).topk(k, dim=-1).values[..., -1]
    assert (kth > 0).all()  # the case the filter is exact for (random inputs: it holds by a wide margin)
    assert recall(ids, ref) == 1.0
    assert torch.equal(ids.sort(-1).values, ref.sort(-1).values)


def test_bottom_block_is_needed():
    """The top x top block alone (the published code) misses the cells where both filter scores are negative."""
    g = torch.Generator().manual_seed(1)
    n, k = 16, 4
    a = TuckerProductKeys(12, n, 2, k, 6, rank=2, cores=1).double().eval()
    set_cores(a, rank1_cores(1, 2, 2, g).double())
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        s_row, s_col = a.side_scores(x)
        _, ref = reference(a, x)
        i = torch.einsum("thai,ha->thi", s_row, a.u).topk(k, -1).indices
        j = torch.einsum("thai,ha->thi", s_col, a.v).topk(k, -1).indices
    top_only = (i.unsqueeze(-1) * n + j.unsqueeze(-2)).flatten(2)
    missed = 1 - recall(top_only, ref)
    print(f"top x top only misses {missed:.3f} of the best cells")
    assert 0.3 < missed < 0.7
    assert recall(a(x)[0], ref) == 1.0


def test_rank2_recall():
    torch.manual_seed(0)
    n, k = 16, 4
    results = {}
    for name in ("uniform init", "normal cores"):
        a = TuckerProductKeys(16, n, 2, k, 8, rank=2, cores=2).eval()
        if name == "normal cores":
            set_cores(a, torch.randn_like(a.cores))
        x = torch.randn(400, 16)
        results[name] = recall(a(x)[0], reference(a, x)[1])
    print("rank-2 recall at prefilter = topk:", {k_: round(v, 3) for k_, v in results.items()})
    assert min(results.values()) > 0.9  # measured 0.98-0.99 (U(0,1) cores are near rank 1)


@pytest.mark.parametrize("score_fn", ["identity", "softmax", "relu", "sigmoid"])
@pytest.mark.parametrize("cores", [1, 3])
def test_exact_with_full_prefilter_weights_and_grads(score_fn, cores):
    """prefilter = n_keys scores every cell: the ids, the per-core weights and every gradient match brute force."""
    torch.manual_seed(0)
    n, k, heads = 7, 3, 2
    a = TuckerProductKeys(
        10, n, heads, k, 6, rank=2, cores=cores, prefilter=n, score_fn=score_fn, query_bias=True
    ).double()
    set_cores(a, torch.randn_like(a.cores))
    x = torch.randn(9, 10, dtype=torch.float64)
    a.eval()
    ids, w = a(x)
    grid, ref = reference(a, x)
    assert torch.equal(ids, ref)  # best first, as the reference
    picked = grid.gather(3, ref.unsqueeze(2).expand(-1, -1, cores, -1))  # (T, H, C, k)
    want = apply_score_fn(picked, score_fn).transpose(-1, -2)
    want = want.squeeze(-1) if cores == 1 else want
    assert w.shape == want.shape
    assert (w - want).abs().max() < 1e-12
    g = torch.randn_like(w)
    params = list(a.parameters())
    got = torch.autograd.grad((w * g).sum(), params)
    exp = torch.autograd.grad((want * g).sum(), params)
    for p, gp, ep in zip(a.parameters(), got, exp):
        assert (gp - ep).abs().max() < 1e-10 * max(1.0, ep.abs().max().item()), p.shape


def test_gradcheck():
    torch.manual_seed(0)
    a = TuckerProductKeys(6, 5, 2, 2, 4, rank=2, cores=2, prefilter=3, query_bias=True).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: a(x)[1], (x,))
    cores = a.cores.detach().clone().requires_grad_()

    def by_cores(c):
        return torch.func.functional_call(a, {"cores": c}, (x.detach(),))[1]

    torch.autograd.gradcheck(by_cores, (cores,))


def test_refresh_schedule():
    torch.manual_seed(0)
    a = TuckerProductKeys(8, 6, 2, 2, 4, rank=2, cores=2, svd_every=3)
    x = torch.randn(4, 8)
    a.eval()
    before = a.u.clone()
    with torch.no_grad():
        a.cores.add_(torch.randn_like(a.cores))
    a(x)
    assert torch.equal(a.u, before) and a.svd_step.item() == 0  # eval never refreshes nor counts
    a.train()
    for step in range(7):
        with torch.no_grad():
            a.cores.add_(0.5 * torch.randn_like(a.cores))
        old_u, old_v = a.u.clone(), a.v.clone()
        fresh_u, fresh_v = a.leading_pair(old_u)
        a(x)
        assert a.svd_step.item() == step + 1
        if step % 3 == 0:
            assert torch.allclose(a.u, fresh_u) and torch.allclose(a.v, fresh_v)
        else:
            assert torch.equal(a.u, old_u) and torch.equal(a.v, old_v)


def test_filter_pair_never_flips_and_tracks_the_leading_pair():
    """Power iteration from the previous pair: u never turns against it (an SVD may return (u, v) or (-u, -v))
    and, on a core that stops changing, converges to a leading singular pair C_sum v = σ1 u."""
    torch.manual_seed(0)
    a = TuckerProductKeys(8, 6, 3, 2, 4, rank=3, cores=2).train()
    x = torch.randn(4, 8)
    base = torch.randn_like(a.cores)
    set_cores(a, base)
    prev_u, prev_v = a.u.clone(), a.v.clone()
    for t in range(30):  # a slowly changing core
        with torch.no_grad():
            a.cores.copy_(base + 0.01 * t * torch.sin(torch.arange(base.numel()).view_as(base) + t))
        a(x)
        assert ((a.u * prev_u).sum(-1) > 0).all() and ((a.v * prev_v).sum(-1) > 0).all()
        prev_u, prev_v = a.u.clone(), a.v.clone()
    for _ in range(200):  # the core stays put: the pair converges
        a(x)
    core = a.cores.detach().sum(0)
    sigma = torch.linalg.svdvals(core)[:, :1, None]  # (H, 1, 1)
    assert torch.allclose(core @ a.v.unsqueeze(-1), sigma * a.u.unsqueeze(-1), atol=1e-4)


def test_singular_values_2x2_closed_form():
    from memlayers.memory.addressing.tucker import singular_values_2x2

    m = torch.randn(50, 2, 2, dtype=torch.float64, requires_grad=True)
    got = singular_values_2x2(m)
    assert torch.allclose(got, torch.linalg.svdvals(m), atol=1e-10)
    (g1,) = torch.autograd.grad(got[:, 1].sum(), m)
    (g2,) = torch.autograd.grad(torch.linalg.svdvals(m)[:, 1].sum(), m)
    assert torch.allclose(g1, g2, atol=1e-6)
    zero = torch.zeros(2, 2, requires_grad=True)
    (g0,) = torch.autograd.grad(singular_values_2x2(zero).sum(), zero)
    assert torch.isfinite(g0).all()  # the epsilon keeps the square roots' gradients finite at 0


def test_aux_loss_value_and_grad():
    torch.manual_seed(0)
    H, r, C, alpha, tau = 3, 3, 2, 0.01, 0.15
    a = TuckerProductKeys(8, 6, H, 2, 4, rank=r, cores=C, aux_weight=alpha, aux_tau=tau).double()
    S = torch.tensor([[2.0, 0.1, 0.05], [1.5, 0.8, 0.3], [1.0, 0.5, 0.2]], dtype=torch.float64)  # some below tau
    U = torch.linalg.qr(torch.randn(H, r, r, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(H, r, r, dtype=torch.float64)).Q
    core_sum = U @ torch.diag_embed(S) @ V.transpose(-1, -2)
    set_cores(a, torch.stack([0.3 * core_sum, 0.7 * core_sum]))
    loss = a.aux_loss()
    # by hand: head 0 has no excess; head 1: (0.65² + 0.15²)/2; head 2: (0.35² + 0.05²)/2
    want = alpha * ((0.65**2 + 0.15**2) / 2 + (0.35**2 + 0.05**2) / 2) / 3
    assert abs(loss.item() - want) < 1e-12
    (grad,) = torch.autograd.grad(loss, a.cores)
    # dλ_i/dC_sum = u_i v_iᵀ, and every core gets dL/dC_sum
    coef = alpha / (r - 1) / H * 2 * torch.clamp(S[:, 1:] - tau, min=0)  # (H, r-1)
    want_grad = torch.einsum("hi,hai,hbi->hab", coef, U[:, :, 1:], V[:, :, 1:])
    assert (grad - want_grad.expand(C, -1, -1, -1)).abs().max() < 1e-12
    assert TuckerProductKeys(8, 6, H, 2, 4, rank=1, cores=C).aux_loss().item() == 0.0
    assert TuckerProductKeys(8, 6, H, 2, 4, aux_weight=0.0).aux_loss() is None


def test_shapes_tiny_empty_and_train_dtypes():
    torch.manual_seed(0)
    a = TuckerProductKeys(15, 5, 2, 5, 6, rank=2, cores=2)  # topk = n_keys
    for T in (0, 1, 3):
        ids, w = a(torch.randn(T, 15))
        assert ids.shape == (T, 2, 5) and ids.dtype == torch.int64 and w.shape == (T, 2, 5, 2)
        assert w.dtype == torch.float32
        assert bool(((ids >= 0) & (ids < 25)).all())
        assert all(len(set(row.tolist())) == 5 for row in ids.reshape(-1, 5))  # no slot chosen twice
    one = TuckerProductKeys(15, 5, 2, 2, 6, rank=2, cores=1)
    assert one(torch.randn(3, 15))[1].shape == (3, 2, 2)
    bf = TuckerProductKeys(16, 6, 2, 2, 8).to(torch.bfloat16)
    ids, w = bf(torch.randn(4, 16, dtype=torch.bfloat16))
    w.float().sum().backward()
    assert bf.cores.grad is not None and bf.keys.grad is not None


def test_no_duplicate_slots_when_blocks_overlap():
    """2 * prefilter > n_keys: a cell in both blocks is counted once."""
    torch.manual_seed(0)
    a = TuckerProductKeys(8, 6, 2, 5, 4, rank=2, cores=1, prefilter=5).eval()
    ids, _ = a(torch.randn(50, 8))
    assert all(len(set(row.tolist())) == 5 for row in ids.reshape(-1, 5))


def test_roles_init_and_flops():
    a = TuckerProductKeys(16, 10, 2, 4, 8, rank=2, cores=3, prefilter=6, score_fn="relu")
    roles = a.param_roles()
    assert roles["keys"] == [a.keys, a.cores]  # addressing tables: no weight decay
    assert {id(p) for p in roles["dense"]} == {id(p) for p in a.parameters()} - {id(a.keys), id(a.cores)}
    assert a.num_slots == 100 and a.grid == 10 and a.heads == 2 and a.topk == 4
    assert a.keys.shape == (2, 2, 2, 10, 4) and a.cores.shape == (3, 2, 2, 2)
    assert bool((a.cores >= 0).all() and (a.cores <= 1).all())
    assert torch.allclose(a.key_norm.weight, torch.full((4,), 0.5))
    assert torch.allclose(a.query_norm.weight, torch.full((4,), expected_top_mean(10, 4) ** -0.5))
    assert a.u.sum() >= 0 and a.v.sum() >= 0
    h, r, n, m, k, C, d, dim = 2, 2, 10, 6, 4, 3, 4, 16
    want = (
        2 * dim * h * 8
        + 2 * 2 * h * r * n * d
        + 2 * 2 * h * r * n
        + 4 * h * n
        + 2 * (2 * h * m * r * r + 2 * h * m * m * r)
        + 2 * h * m * m
        + 2 * h * k * C * (r * r + r)
        + score_fn_flops("relu", h * k * C)
    )
    assert a.flops_per_token() == want
    per_rank = TuckerProductKeys(16, 10, 2, 4, 8, rank=2, cores=3, prefilter=6, score_fn="relu", query_per_rank=True)
    assert per_rank.query.out_features == 2 * 2 * 8
    assert per_rank.flops_per_token() - a.flops_per_token() == 2 * dim * h * 8


def test_expected_top_mean():
    assert expected_top_mean(1024, 32) == expected_top_mean(1024, 32)  # deterministic
    assert 2.1 < expected_top_mean(1024, 32) < 2.4  # the mean of the top 1/32 of N(0, 1): about 2.25
    assert abs(expected_top_mean(8, 8)) < 0.01


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(key_dim=5), "key_dim"),
        (dict(rank=0), "rank"),
        (dict(cores=0), "cores"),
        (dict(prefilter=2), "prefilter"),
        (dict(prefilter=9), "prefilter"),
        (dict(topk=9), "topk"),
        (dict(svd_every=0), "svd_every"),
        (dict(score_fn="tanh"), "score_fn"),
        (dict(aux_weight=-1.0), "aux_weight"),
    ],
)
def test_bad_arguments(kwargs, field):
    args = dict(dim=8, n_keys=8, heads=2, topk=3, key_dim=4) | kwargs
    with pytest.raises(ValueError, match=field):
        TuckerProductKeys(**args)
