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
