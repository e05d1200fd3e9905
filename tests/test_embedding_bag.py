import pytest
import torch
from conftest import DEVICES, TOL, rel_err

from memlayers.ops import embedding_bag, embedding_bag_naive

SIZES = [  # (N, d, T, L): odd dims, N and T not powers of two, single-entry bags
    (1000, 37, 13, 9),
    (97, 1, 5, 3),
    (64, 100, 33, 1),
    (5, 8, 64, 16),  # heavy collisions: 1024 entries over 5 rows
]


def _inputs(N, d, T, L, dtype, device="cpu"):
    values = torch.randn(N, d, dtype=dtype, device=device, requires_grad=True)
    indices = torch.randint(0, N, (T, L), device=device)
    weights = torch.randn(T, L, dtype=dtype, device=device, requires_grad=True)
    return values, indices, weights


def _oracle(values, indices, weights, grad_out):
    """Forward and gradients of the naive gather in float64."""
    v = values.detach().double().requires_grad_()
    w = weights.detach().double().requires_grad_()
    out = embedding_bag_naive(v, indices, w)
    out.backward(grad_out.double())
    return out, v.grad, w.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,d,T,L", SIZES)
def test_forward_backward_match_naive(dtype, N, d, T, L, device):
    values, indices, weights = _inputs(N, d, T, L, dtype, device)
    out = embedding_bag(values, indices, weights)
    grad_out = torch.randn(T, d, dtype=dtype, device=device)
    out.backward(grad_out)
    ref_out, ref_dv, ref_dw = _oracle(values, indices, weights, grad_out)
    assert out.dtype == dtype and values.grad.dtype == dtype and weights.grad.dtype == dtype
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(values.grad, ref_dv) < TOL[dtype]
    assert rel_err(weights.grad, ref_dw) < TOL[dtype]


def test_int32_indices_match_int64():
    values, indices, weights = _inputs(50, 7, 6, 4, torch.float32)
    assert torch.equal(embedding_bag(values, indices.int(), weights), embedding_bag(values, indices, weights))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_grad_equals_dense_grad(dtype, device):
    values, indices, weights = _inputs(300, 11, 17, 5, dtype, device)
    embedding_bag(values, indices, weights).sum().backward()
    dense = values.grad
    values.grad = None
    embedding_bag(values, indices, weights, sparse_grad=True).sum().backward()
    sparse = values.grad
    assert sparse.is_sparse
    assert sparse._nnz() == indices.unique().numel()  # only touched rows are stored
    assert torch.equal(sparse.to_dense(), dense)


def test_gradcheck_float64():
    values, indices, weights = _inputs(20, 3, 4, 5, torch.float64)
    indices[0, :2] = 7  # a repeated row inside one bag
    assert torch.autograd.gradcheck(lambda v, w: embedding_bag(v, indices, w), (values, weights))


@pytest.mark.parametrize("T,L", [(0, 4), (3, 0), (0, 0)])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_empty_batch(T, L, sparse_grad):
    values, indices, weights = _inputs(10, 6, T, L, torch.float32)
    out = embedding_bag(values, indices, weights, sparse_grad=sparse_grad)
    assert out.shape == (T, 6) and torch.all(out == 0)
    out.sum().backward()
    assert values.grad is not None and torch.all(values.grad.to_dense() == 0)
    assert weights.grad.shape == (T, L)


def test_zero_weights_still_route_gradient_to_weights():
    values, indices, weights = _inputs(30, 4, 5, 3, torch.float32)
    with torch.no_grad():
        weights.zero_()
    out = embedding_bag(values, indices, weights)
    assert torch.all(out == 0)
    out.sum().backward()
    assert weights.grad.abs().sum() > 0


def test_no_gathered_intermediate_in_forward():
    """Forward memory must not scale with T*L*d: a bag whose gathered rows would be 4 GiB runs fine."""
    values = torch.randn(1024, 1024)
    indices = torch.randint(0, 1024, (8192, 128))  # gathered: 8192*128*1024 fp32 = 4 GiB
    out = embedding_bag(values, indices, torch.rand(8192, 128))
    assert out.shape == (8192, 1024) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda v, i, w: (v[0], i, w), "values must be a 2-D"),
        (lambda v, i, w: (v.long(), i, w), "values must be floating point"),
        (lambda v, i, w: (v, i.flatten(), w), "indices must be 2-D"),
        (lambda v, i, w: (v, i.float(), w), "indices must be int64 or int32"),
        (lambda v, i, w: (v, i, w[:, :1]), "weights shape"),
        (lambda v, i, w: (v, i, w.long()), "weights must be floating point"),
        (lambda v, i, w: (v, i.to("meta"), w), "one device"),
    ],
)
def test_bad_inputs(make, match):
    v, i, w = _inputs(10, 4, 3, 2, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        embedding_bag(*make(v, i, w))


@pytest.mark.parametrize("backward", ["sorted", "atomics"])
def test_triton_dispatch_matches_reference(backward):
    pytest.importorskip("triton")
    values, indices, weights = _inputs(40, 37, 6, 5, torch.float32, DEVICES[-1])
    outs, grads = [], []
    for impl in ("reference", "triton"):
        out = embedding_bag(values, indices, weights, impl=impl, backward=backward)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (values, weights)))
    assert rel_err(outs[1], outs[0]) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads[1], grads[0]))


def test_bad_impl_and_backward():
    v, i, w = _inputs(10, 4, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        embedding_bag(v, i, w, impl="cuda")
    with pytest.raises(ValueError, match="backward must be one of"):
        embedding_bag(v, i, w, backward="fast")


def test_out_of_range_index_raises():
    v, i, w = _inputs(10, 4, 3, 2, torch.float32)
    with pytest.raises((IndexError, RuntimeError)):
        embedding_bag(v, i + 10, w)


@pytest.mark.parametrize("N,d,T,L", SIZES)
def test_dense_value_grad_is_the_row_grads_scattered(N, d, T, L):
    """``value_grad`` (one bag per table row) equals ``value_row_grads`` scattered into zeros, bit for bit,
    and takes int32 indices alike; rows come sorted and unique."""
    from memlayers.ops.embedding_bag.reference import value_grad, value_row_grads

    _, indices, weights = _inputs(N, d, T, L, torch.float32)
    grad_out = torch.randn(T, d)
    rows, row_grads = value_row_grads(indices, weights.detach(), grad_out)
    assert torch.equal(rows, indices.unique())
    dense = torch.zeros(N, d).index_copy_(0, rows, row_grads)
    assert torch.equal(value_grad(indices, weights.detach(), grad_out, N), dense)
    assert torch.equal(value_grad(indices.int(), weights.detach(), grad_out, N), dense)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_value_grad_is_deterministic(sparse_grad):
    """Heavy collisions (4,096 entries on 7 rows): the same bits on 1 and 2 threads and run to run; a sparse
    gradient is coalesced (sorted unique rows)."""
    values, indices, weights = _inputs(7, 33, 256, 16, torch.float32)
    grad_out = torch.randn(256, 33)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(embedding_bag(values, indices, weights, sparse_grad), values, grad_out)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g.to_dense(), grads[0].to_dense()) for g in grads[1:])
    if sparse_grad:
        assert grads[0].is_coalesced() and torch.equal(grads[0]._indices()[0], torch.arange(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weight_grad_matches_naive(dtype, monkeypatch):
    """fp32/fp64 tables (torch's per-entry dot products) and 16-bit ones (chunks of gathered rows, here 3
    tokens per chunk: the last one short) against the float64 gather; int32 indices alike."""
    from memlayers.ops.embedding_bag import reference

    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 3 * 5 * 19)
    values = torch.randn(41, 19).to(dtype)
    indices = torch.randint(0, 41, (11, 5))
    grad_out = torch.randn(11, 19)
    dw = reference.weight_grad(values, indices, grad_out)
    expected = torch.einsum("tld,td->tl", values.double()[indices], grad_out.double())
    assert dw.dtype == torch.promote_types(dtype, torch.float32)
    assert rel_err(dw, expected) < TOL[dw.dtype]
    assert torch.equal(reference.weight_grad(values, indices.int(), grad_out), dw)


@pytest.mark.parametrize("bad", [-1, 10])
def test_weight_grad_rejects_out_of_range_indices(bad):
    """torch's per-entry kernel reads wherever an index points: the reference checks first."""
    from memlayers.ops.embedding_bag.reference import weight_grad

    indices = torch.zeros(3, 2, dtype=torch.long)
    indices[1, 1] = bad
    with pytest.raises(IndexError, match=r"indices must be in \[0, 10\)"):
        weight_grad(torch.randn(10, 4), indices, torch.randn(3, 4))


def _keyed_oracle(values, indices, weights, bags, num_bags, grad_out):
    """Keyed bags by scatter-adding every gathered row in float64: forward and gradients."""
    v = values.detach().double().requires_grad_()
    w = weights.detach().double().requires_grad_()
    rows = (w.unsqueeze(-1) * v[indices]).reshape(-1, v.shape[1])
    out = torch.zeros(num_bags, v.shape[1], dtype=torch.float64).index_add(0, bags.reshape(-1).long(), rows)
    out.backward(grad_out.double())
    return out, v.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("N,d,T,L", SIZES)
def test_keyed_bags_match_scatter(N, d, T, L, dtype, sparse_grad):
    """Entries land in the output rows ``bags`` names (several per token, rows left empty, collisions), in any
    order; int32 bags alike."""
    values, indices, weights = _inputs(N, d, T, L, dtype)
    num_bags = 2 * T + 3  # some rows get nothing
    bags = torch.randint(0, num_bags, (T, L))
    out = embedding_bag(values, indices, weights, sparse_grad, bags=bags, num_bags=num_bags)
    grad_out = torch.randn(num_bags, d, dtype=dtype)
    out.backward(grad_out)
    want, dv, dw = _keyed_oracle(values, indices, weights, bags, num_bags, grad_out)
    assert out.shape == (num_bags, d) and out.dtype == dtype
    assert values.grad.is_sparse == sparse_grad
    for got, ref in ((out, want), (values.grad.to_dense(), dv), (weights.grad, dw)):
        assert rel_err(got, ref) < TOL[dtype]
    assert torch.equal(embedding_bag(values, indices, weights, bags=bags.int(), num_bags=num_bags), out)


def test_keyed_bags_of_one_bag_per_token_are_the_plain_bag():
    values, indices, weights = _inputs(50, 9, 7, 4, torch.float32)
    bags = torch.arange(7).unsqueeze(1).expand(7, 4)
    plain = embedding_bag(values, indices, weights)
    keyed = embedding_bag(values, indices, weights, bags=bags, num_bags=7)
    assert rel_err(keyed, plain) < 1e-6
    g = torch.randn(7, 9)
    for a, b in zip(torch.autograd.grad(keyed, (values, weights), g), torch.autograd.grad(plain, (values, weights), g)):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_keyed_bags_empty(sparse_grad):
    values, indices, weights = _inputs(10, 6, 0, 4, torch.float32)
    out = embedding_bag(values, indices, weights, sparse_grad, bags=indices.clone(), num_bags=3)
    assert out.shape == (3, 6) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(values.grad.to_dense() == 0) and weights.grad.shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bags=torch.zeros(3, 1, dtype=torch.long), num_bags=2), "bags shape"),
        (dict(bags=torch.zeros(3, 2), num_bags=2), "bags must be int64 or int32"),
        (dict(bags=torch.zeros(3, 2, dtype=torch.long)), "need num_bags"),
        (dict(bags=torch.zeros(3, 2, dtype=torch.long), num_bags=-1), "need num_bags"),
        (dict(num_bags=2), "pass bags too"),
        (dict(bags=torch.zeros(3, 2, dtype=torch.long), num_bags=2, impl="triton"), "have no Triton kernel|needs CUDA"),
        (dict(bags=torch.zeros(3, 2, dtype=torch.long), num_bags=2, value_grad_sink=print), "no value_grad_sink"),
    ],
)
def test_keyed_bags_bad_inputs(kwargs, match):
    v, i, w = _inputs(10, 4, 3, 2, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        embedding_bag(v, i, w, **kwargs)


@pytest.mark.parametrize("bad", [-1, 5])
def test_keyed_bags_out_of_range(bad):
    v, i, w = _inputs(10, 4, 3, 2, torch.float32)
    bags = torch.zeros(3, 2, dtype=torch.long)
    bags[2, 1] = bad
    with pytest.raises(IndexError, match=r"bags must be in \[0, 5\)"):
        embedding_bag(v, i, w, bags=bags, num_bags=5)


@pytest.mark.parametrize("n", [0, 5, 8191, 8192, 24576, 32767, 32768, 40000])
@pytest.mark.parametrize("bound", [None, 100, 2**40])
def test_sort_ids_is_a_stable_sort(n, bound):
    """Padded up to torch's radix sort or not, the same sorted ids and order as a stable sort (ties by position)."""
    from memlayers.ops.embedding_bag.reference import sort_ids

    ids = torch.randint(0, 100 if bound is None else min(bound, 100), (n,))
    ids[: n // 7] = torch.iinfo(torch.int32).max  # the padding's value among the ids: still before the padding
    got, order = sort_ids(ids, bound)
    want, want_order = torch.sort(ids, stable=True)
    assert torch.equal(got.long(), want) and torch.equal(order, want_order)
