"""Triton gather_dot against the torch reference.

Without a GPU the kernel runs on CPU under ``TRITON_INTERPRET=1`` (set by conftest): it checks
indexing, masking and arithmetic, not races (there are none: every program writes its own outputs).
With a GPU (and TRITON_INTERPRET unset) the same tests run the compiled kernel on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import TOL, poison_allocations, rel_err
from conftest import TRITON_DEVICE as DEVICE

from memlayers.ops.gather_dot import gather_dot, gather_dot_reference
from memlayers.ops.gather_dot.triton_kernel import gather_dot_triton


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Buffers the wrappers allocate with empty/empty_like start as NaN (floats)."""
    poison_allocations(monkeypatch, int_fill=None)


def make(N, T, L, d, dtype, index_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(N, d, generator=g).to(DEVICE, dtype)
    ids = torch.randint(0, N, (T, L), generator=g).to(DEVICE, index_dtype)
    x = torch.randn(T, d, generator=g).to(DEVICE, dtype)
    grad_out = torch.randn(T, L, generator=g).to(DEVICE)
    return table, ids, x, grad_out


def run(fn, table, ids, x, grad_out):
    t = table.clone().requires_grad_()
    xx = x.clone().requires_grad_()
    out = fn(t, ids, xx)
    return (out, *torch.autograd.grad(out, (t, xx), grad_out))


def exact(table, ids, x):
    return torch.einsum("tld,td->tl", table[ids.long()].double(), x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [1, 37, 300])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_forward_matches_reference(dtype, d, index_dtype):
    table, ids, x, _ = make(50, 7, 19, d, dtype, index_dtype)
    out = gather_dot_triton(table, ids, x)
    assert out.dtype == torch.float32
    assert rel_err(out, exact(table, ids, x)) < 1e-5  # exact products of 16-bit inputs, fp32 sums
    assert rel_err(out, gather_dot_reference(table, ids.long(), x)) < 1e-5


@pytest.mark.parametrize(
    "config", [{"BLOCK_L": 1, "BLOCK_D": 16, "num_warps": 1}, {"BLOCK_L": 4, "BLOCK_D": 32, "num_warps": 2}]
)
def test_configs_tile_l_and_d(config):
    """L=11 and d=100 leave partial tiles in both directions."""
    table, ids, x, _ = make(40, 3, 11, 100, torch.float32)
    assert rel_err(gather_dot_triton(table, ids, x, config=config), exact(table, ids, x)) < 1e-5


def test_float64_and_mixed_dtypes():
    table, ids, x, _ = make(30, 5, 4, 19, torch.float64)
    out = gather_dot_triton(table, ids, x)
    assert out.dtype == torch.float64 and rel_err(out, exact(table, ids, x)) < 1e-12
    out = gather_dot_triton(table.float(), ids, x.bfloat16())
    assert out.dtype == torch.float32
    assert rel_err(out, exact(table.float(), ids, x.bfloat16())) < 1e-5


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 37), (torch.bfloat16, 100), (torch.float16, 1)])
def test_autograd_matches_reference(sparse_grad, dtype, d):
    table, ids, x, grad_out = make(60, 9, 6, d, dtype, torch.int32)
    ids[2] = ids[0, 0]  # one row read by several entries
    ours = run(lambda t, i, xx: gather_dot(t, i, xx, sparse_grad, impl="triton"), table, ids, x, grad_out)
    ref = run(lambda t, i, xx: gather_dot(t, i, xx, sparse_grad, impl="reference"), table, ids, x, grad_out)
    assert ours[1].is_sparse == sparse_grad
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    assert rel_err(ours[0], ref[0]) < 1e-5
    for a, b in zip(ours[1:], ref[1:]):
        assert rel_err(a, b) < TOL[dtype]
    if sparse_grad:
        assert torch.equal(ours[1]._indices(), ref[1]._indices())


@pytest.mark.parametrize("T,L", [(0, 4), (3, 0)])
def test_empty_batch(T, L):
    table, ids, x, grad_out = make(10, T, L, 8, torch.float32)
    out, dt, dx = run(lambda t, i, xx: gather_dot(t, i, xx, impl="triton"), table, ids, x, grad_out)
    assert out.shape == (T, L)
    assert dt.shape == table.shape and not dt.any()
    assert dx.shape == (T, 8) and not dx.any()


def test_single_id_per_token():
    table, ids, x, _ = make(40, 9, 1, 37, torch.float32)
    assert rel_err(gather_dot_triton(table, ids, x), exact(table, ids, x)) < 1e-5


def test_noncontiguous_inputs():
    table, ids, x, _ = make(40, 6, 5, 37, torch.float32)
    table = table.t().contiguous().t()  # column-major table
    ids = ids.t().contiguous().t()
    x = x[:1].expand(6, 37)  # row stride 0
    assert rel_err(gather_dot_triton(table, ids, x), exact(table, ids, x)) < 1e-5
    x = torch.randn(6, 74, device=DEVICE)[:, ::2]  # column stride 2
    assert rel_err(gather_dot_triton(table, ids, x), exact(table, ids, x)) < 1e-5


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_out_is_overwritten_in_its_dtype(out_dtype):
    """The bag's backward passes ``out`` in its weights' dtype: the float32 sums are cast on store."""
    table, ids, x, _ = make(25, 6, 9, 300, torch.bfloat16)
    out = torch.full((6, 9), float("nan"), dtype=out_dtype, device=DEVICE)
    assert gather_dot_triton(table, ids, x, out=out) is out
    assert rel_err(out, exact(table, ids, x)) < TOL[out_dtype]
