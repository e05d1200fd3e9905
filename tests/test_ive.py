"""ImplicitValueExpansion against the explicitly expanded table Ṽ = [V W_1; ...; V W_E] (permuted), read by a
plain bag."""

import pytest
import torch
from conftest import TOL, rel_err

from memlayers.memory.stores.ive import ImplicitValueExpansion
from memlayers.ops.embedding_bag import embedding_bag_naive


def explicit(store: ImplicitValueExpansion, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Materialise every virtual value, per core c from column slice c of the physical rows, and bag them."""
    N, E, d = store.num_values, store.expansion, store.value_dim
    s = store.perm  # virtual id v -> shuffled id s: block s // N, physical row s % N
    T, L = ids.shape[0], ids[0].numel()
    w = weights.reshape(T, L, -1)
    out = 0
    for c in range(w.shape[-1]):
        cols = torch.zeros(d, dtype=store.weight.dtype)
        cols[c * d // w.shape[-1] : (c + 1) * d // w.shape[-1]] = 1
        V = store.weight * cols  # only slice c (all of it when one weight per slot)
        table = torch.einsum("nd,pdo->pno", V, store.proj).reshape(E * N, -1)[s]  # (E*N, out): row v = V[r] W_p
        out = out + embedding_bag_naive(table, ids.reshape(T, L), w[..., c])
    return out


def make(N=6, d=4, E=4, out=5, C=1, T=7, H=2, k=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = ImplicitValueExpansion(N, d, E, out, cores=C, seed=seed).to(dtype)
    with torch.no_grad():  # O(1) values, so the comparison is not dominated by tiny numbers
        store.weight.normal_(generator=g)
        store.proj.normal_(generator=g)
    ids = torch.randint(0, E * N, (T, H, k), generator=g)
    shape = (T, H, k) if C == 1 else (T, H, k, C)
    weights = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return store, ids, weights


def collide(store: ImplicitValueExpansion, ids: torch.Tensor) -> torch.Tensor:
    """ids with collisions: a virtual id chosen by both heads and twice by one head, and two virtual ids of
    the same physical row in different blocks."""
    ids = ids.clone()
    ids[:, 1, 0] = ids[:, 0, 0]  # the same slot from two heads
    ids[:, 0, 1] = ids[:, 0, 0]  # twice from one head
    inverse = torch.argsort(store.perm)  # shuffled id -> virtual id
    s = store.perm[ids[:, 0, 2]]
    ids[:, 1, 2] = inverse[(s + store.num_values) % store.num_slots]  # same physical row, next block
    return ids


@pytest.mark.parametrize("C", [1, 2, 4])
@pytest.mark.parametrize("with_collisions", [False, True])
def test_implicit_matches_explicit(C, with_collisions):
    store, ids, weights = make(N=5, d=8, E=4, out=3, C=C, T=9, H=2, k=3)
    if with_collisions:
        ids = collide(store, ids)
    w = weights.clone().requires_grad_()
    got = store(ids, w)
    want = explicit(store, ids, w)
    assert got.shape == (9, 3)
    assert rel_err(got, want) < TOL[torch.float64]
    g = torch.randn_like(got)
    params = [store.weight, store.proj, w]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        assert rel_err(a, b) < TOL[torch.float64]


def test_collisions_are_added():
    """All slots of a token on one virtual id: the output is (Σ w) V[r] W_p, not one w's share."""
    store, _, _ = make(N=4, d=4, E=2, out=3)
    ids = torch.full((2, 2, 3), 5)
    weights = torch.rand(2, 2, 3, dtype=torch.float64)
    s = store.perm[5]
    one = store.weight[s % 4] @ store.proj[s // 4]
    want = weights.sum((1, 2)).unsqueeze(1) * one
    assert rel_err(store(ids, weights), want) < TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    store, ids, weights = make(N=7, d=6, E=3, out=5, C=2, T=11, dtype=torch.float64)
    want = explicit(store, ids, weights)
    low = store.to(dtype)
    got = low(ids, weights.float())
    assert got.dtype == dtype
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_gradcheck():
    store, ids, weights = make(N=3, d=4, E=2, out=3, C=2, T=3, H=2, k=3)
    ids = collide(store, ids)
    w = weights.clone().requires_grad_()

    def f(V, W, w):
        return torch.func.functional_call(store, {"weight": V, "proj": W}, (ids, w))

    torch.autograd.gradcheck(
        f, (store.weight.detach().clone().requires_grad_(), store.proj.detach().clone().requires_grad_(), w)
    )


@pytest.mark.parametrize("C", [1, 2])
def test_sparse_grad(C):
    dense, ids, weights = make(N=9, d=4, E=4, out=3, C=C)
    sparse = ImplicitValueExpansion(9, 4, 4, 3, cores=C, sparse_grad=True).double()
    sparse.load_state_dict(dense.state_dict())
    g = torch.randn(7, 3, dtype=torch.float64)
    dense(ids, weights).backward(g)
    sparse(ids, weights).backward(g)
    assert sparse.weight.grad.is_sparse
    assert rel_err(sparse.weight.grad, dense.weight.grad) < TOL[torch.float64]
    assert rel_err(sparse.proj.grad, dense.proj.grad) < TOL[torch.float64]
    touched = sparse.weight.grad.coalesce().indices()[0]
    read = (dense.perm[ids.flatten()] % 9).unique()
    assert torch.equal(touched.sort().values, read)  # exactly the physical rows the tokens read


def test_permutation_and_state():
    a = ImplicitValueExpansion(6, 4, 4, 3, seed=1)
    assert torch.equal(a.perm.sort().values, torch.arange(24))
    assert torch.equal(a.perm, ImplicitValueExpansion(6, 4, 4, 3, seed=1).perm)
    assert not torch.equal(a.perm, ImplicitValueExpansion(6, 4, 4, 3, seed=2).perm)
    b = ImplicitValueExpansion(6, 4, 4, 3, seed=2)
    assert set(a.state_dict()) == {"weight", "proj", "perm"}
    b.load_state_dict(a.state_dict())
    ids, w = torch.randint(0, 24, (5, 2, 3)), torch.randn(5, 2, 3)
    assert torch.equal(a(ids, w), b(ids, w))


def test_empty_and_single():
    store, _, _ = make(N=4, d=4, E=2, out=3, C=2)
    assert store(torch.zeros(0, 2, 3, dtype=torch.long), torch.zeros(0, 2, 3, 2, dtype=torch.float64)).shape == (0, 3)
    assert store(torch.tensor([[[7]]]), torch.ones(1, 1, 1, 2, dtype=torch.float64)).shape == (1, 3)


def test_accounting_roles_signature_init():
    torch.manual_seed(0)
    s = ImplicitValueExpansion(1000, 32, 4, 16, cores=2, sparse_grad=True, init_std=0.05, lr_decay=(10.0, 1.0))
    assert s.num_slots == 4000 and s.out_dim == 16 and s.lr_decay == (10.0, 1.0)
    assert s.param_roles() == {"values": [s.weight], "dense": [s.proj]}
    assert s.read_params(64) == 64 * 32
    assert s.read_flops(64) == 2 * 64 * 32 + 2 * 4 * 32 * 16
    assert s.signature() == dict(num_slots=4000, out_dim=16, sparse_grad=True, value_dim=32, expansion=4, cores=2)
    assert abs(s.weight.std().item() - 0.05) < 0.005
    assert abs(s.proj.std().item() - (4 * 32) ** -0.5) < 0.01
    assert abs(ImplicitValueExpansion(1000, 32, 4, 16).weight.std().item() - 32**-0.5) < 0.01


def test_wrong_core_count():
    store, ids, _ = make(C=1)
    with pytest.raises(ValueError, match="cores"):
        store(ids, torch.randn(*ids.shape, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(num_values=0), "num_values"),
        (dict(value_dim=0), "value_dim"),
        (dict(expansion=0), "expansion"),
        (dict(out_dim=0), "out_dim"),
        (dict(cores=3), "cores"),
    ],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ImplicitValueExpansion(**(dict(num_values=4, value_dim=4, expansion=2, out_dim=3) | kwargs))


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("C", [1, 2])
def test_expanded_bags_match_keyed_bags(C, sparse_grad, monkeypatch):
    """The two poolings compute one function: keyed bags (each row read once, the reference's) and one
    fixed-length bag per (token, block) with the other blocks' entries at weight 0 (the Triton kernels')."""
    from memlayers.memory.stores import ive

    store, ids, weights = make(N=5, d=8, E=4, out=3, C=C, T=9, H=2, k=3)
    store.sparse_grad = sparse_grad
    ids = collide(store, ids)
    results = []
    for expanded in (False, True):
        monkeypatch.setattr(ive, "use_triton", lambda *args, expanded=expanded: expanded)
        w = weights.clone().requires_grad_()
        out = store(ids, w)
        grads = torch.autograd.grad(out, (store.weight, store.proj, w), torch.ones_like(out))
        results.append((out, *[g.to_dense() for g in grads]))
    for a, b in zip(*results):
        assert rel_err(a, b) < TOL[torch.float64]
