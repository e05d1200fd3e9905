"""gather_dot (reference path) against the naive gather-then-dot, in float64."""

import pytest
import torch
from conftest import DEVICES, TOL, rel_err

from memlayers.ops.embedding_bag import reference as bag_reference
from memlayers.ops.gather_dot import gather_dot

SIZES = [  # (N, d, T, L): odd widths, N and T not powers of two, single-id rows, heavy collisions
    (1000, 37, 13, 9),
    (97, 1, 5, 3),
    (64, 100, 33, 1),
    (5, 8, 64, 16),
]


def _inputs(N, d, T, L, dtype, device="cpu", x_dtype=None):
    table = torch.randn(N, d, device=device).to(dtype).requires_grad_()
    ids = torch.randint(0, N, (T, L), device=device)
    x = torch.randn(T, d, device=device).to(x_dtype or dtype).requires_grad_()
    return table, ids, x


def _naive(table, ids, x, grad_out):
    """Forward (materialising the (T, L, d) gather) and both gradients in float64."""
    t = table.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    out = torch.einsum("tld,td->tl", t[ids], xd)
    out.backward(grad_out.double())
    return out, t.grad, xd.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,d,T,L", SIZES)
def test_forward_backward_match_naive(dtype, N, d, T, L, device):
    table, ids, x = _inputs(N, d, T, L, dtype, device)
    out = gather_dot(table, ids, x, impl="reference")
    grad_out = torch.randn(T, L, device=device)
    out.backward(grad_out)
    ref_out, ref_dt, ref_dx = _naive(table, ids, x, grad_out)
    assert out.dtype == torch.float32  # pre-activations stay in float32 whatever the inputs
    assert table.grad.dtype == dtype and x.grad.dtype == dtype
    assert rel_err(out, ref_out) < 1e-5  # exact products of 16-bit inputs, summed in float32
    assert rel_err(table.grad, ref_dt) < TOL[dtype]
    assert rel_err(x.grad, ref_dx) < TOL[dtype]


def test_mixed_dtypes_and_float64():
    table, ids, x = _inputs(40, 12, 7, 5, torch.float32, x_dtype=torch.bfloat16)
    out = gather_dot(table, ids, x)
    grad_out = torch.randn(7, 5)
    out.backward(grad_out)
    ref = _naive(table, ids, x, grad_out)
    assert out.dtype == torch.float32 and table.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert rel_err(out, ref[0]) < 1e-5 and rel_err(table.grad, ref[1]) < 1e-2 and rel_err(x.grad, ref[2]) < 1e-2
    table64, ids64, x64 = _inputs(40, 12, 7, 5, torch.float64)
    assert gather_dot(table64, ids64, x64).dtype == torch.float64
    assert gather_dot(table64.float(), ids64, x64).dtype == torch.float64


def test_gradcheck_float64():
    table, ids, x = _inputs(9, 3, 4, 5, torch.float64)
    ids[0, :3] = 7  # a row repeated inside one token's ids
    ids[2, 0] = 7  # and read by another token
    assert torch.autograd.gradcheck(lambda t, xx: gather_dot(t, ids, xx), (table, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_grad_equals_dense_grad(dtype, device):
    table, ids, x = _inputs(300, 11, 17, 5, dtype, device)
    ids[3, :] = ids[0, 0]  # duplicates within and across tokens
    grad_out = torch.randn(17, 5, device=device)
    gather_dot(table, ids, x).backward(grad_out)
    dense, dx_dense = table.grad, x.grad
    table.grad = x.grad = None
    gather_dot(table, ids, x, sparse_grad=True).backward(grad_out)
    sparse = table.grad
    assert sparse.is_sparse
    assert torch.equal(sparse._indices()[0], ids.unique())  # touched rows only, sorted and unique
    assert torch.equal(sparse.to_dense(), dense)
    assert torch.equal(x.grad, dx_dense)


def test_int32_ids_match_int64():
    table, ids, x = _inputs(50, 7, 6, 4, torch.float32)
    assert torch.equal(gather_dot(table, ids.int(), x), gather_dot(table, ids, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_forward_matches_one_chunk(dtype, monkeypatch):
    """A 16-bit table is gathered over chunks of tokens: chunks of 2 tokens (11 tokens: the last chunk is short)
    give the same values as one chunk, and the float32 table's per-entry dot products agree with them."""
    table, ids, x = _inputs(30, 6, 11, 4, dtype)
    whole = gather_dot(table, ids, x)
    monkeypatch.setattr(bag_reference, "_CHUNK_ELEMENTS", 2 * 4 * 6)  # the chunking lives in the bag's weight grad
    assert torch.equal(gather_dot(table, ids, x), whole)
    assert rel_err(gather_dot(table.float(), ids, x.float()), whole) < 1e-6


@pytest.mark.parametrize("T,L", [(0, 4), (3, 0), (0, 0)])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_empty_batch(T, L, sparse_grad):
    table, ids, x = _inputs(10, 6, T, L, torch.float32)
    out = gather_dot(table, ids, x, sparse_grad)
    assert out.shape == (T, L)
    out.sum().backward()
    assert table.grad is not None and table.grad.shape == (10, 6) and not table.grad.to_dense().any()
    assert x.grad.shape == (T, 6) and not x.grad.any()


def test_single_id_per_token_is_a_row_dot():
    table, ids, x = _inputs(20, 5, 8, 1, torch.float32)
    expected = (table[ids[:, 0]] * x).sum(-1, keepdim=True)
    assert rel_err(gather_dot(table, ids, x), expected) < 1e-6


def test_only_x_or_only_table_needs_grad():
    table, ids, x = _inputs(20, 5, 6, 3, torch.float32)
    grad_out = torch.randn(6, 3)
    ref = _naive(table, ids, x, grad_out)
    (dx,) = torch.autograd.grad(gather_dot(table.detach(), ids, x), x, grad_out)
    (dt,) = torch.autograd.grad(gather_dot(table, ids, x.detach()), table, grad_out)
    assert rel_err(dx, ref[2]) < 1e-5 and rel_err(dt, ref[1]) < 1e-5


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t, i, x: (t[0], i, x), "table must be a 2-D"),
        (lambda t, i, x: (t.long(), i, x), "table must be floating point"),
        (lambda t, i, x: (t, i.flatten(), x), "ids must be 2-D"),
        (lambda t, i, x: (t, i.float(), x), "ids must be int64 or int32"),
        (lambda t, i, x: (t, i, x.long()), "x must be floating point"),
        (lambda t, i, x: (t, i, x[:, :2]), r"x must be \(T, d\) = \(3, 4\)"),
        (lambda t, i, x: (t, i, x[:2]), r"x must be \(T, d\)"),
        (lambda t, i, x: (t, i.to("meta"), x), "one device"),
    ],
)
def test_bad_inputs(make, match):
    t, i, x = _inputs(10, 4, 3, 2, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match) as err:
        gather_dot(*make(t, i, x))
    assert "\n" not in str(err.value)


def test_bad_impl():
    t, i, x = _inputs(10, 4, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        gather_dot(t, i, x, impl="cuda")


def test_out_of_range_id_raises():
    t, i, x = _inputs(10, 4, 3, 2, torch.float32)
    with pytest.raises((IndexError, RuntimeError)):
        gather_dot(t, i + 10, x, impl="reference")
