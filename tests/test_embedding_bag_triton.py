"""Triton embedding bag against the torch reference.

Without a GPU the kernels run on CPU under ``TRITON_INTERPRET=1``. The interpreter runs programs one
after another, so it checks indexing, masking and arithmetic, not races; it also truncates
fp32 -> bf16/fp16 on store (GPUs round to nearest), which the 1e-2 tolerance for 16-bit tables absorbs.
With a GPU (and TRITON_INTERPRET unset) the same tests run the compiled kernels on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import TOL, poison_allocations, rel_err
from conftest import TRITON_DEVICE as DEVICE

from memlayers.ops.bag_update import triton_kernel
from memlayers.ops.embedding_bag.reference import embedding_bag_reference, value_row_grads
from memlayers.ops.embedding_bag.triton_autograd import embedding_bag_triton
from memlayers.ops.embedding_bag.triton_backward import bag_backward_triton, value_grad_triton, weight_grad_triton
from memlayers.ops.embedding_bag.triton_forward import bag_forward_triton


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Buffers the wrappers allocate with empty/empty_like start as NaN (floats) or 7 (ints)."""
    poison_allocations(monkeypatch)


def make(N, T, L, d, dtype, index_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, d, generator=g).to(DEVICE, dtype)
    indices = torch.randint(0, N, (T, L), generator=g).to(DEVICE, index_dtype)
    weights = torch.randn(T, L, generator=g).to(DEVICE)
    grad_out = torch.randn(T, d, generator=g).to(DEVICE, dtype)
    return values, indices, weights, grad_out


def run(fn, values, indices, weights, grad_out):
    v = values.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = fn(v, indices, w)
    return (out, *torch.autograd.grad(out, (v, w), grad_out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [1, 37, 100])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_forward_matches_reference(dtype, d, index_dtype):
    values, indices, weights, _ = make(50, 7, 5, d, dtype, index_dtype)
    out = torch.full((7, d), float("nan"), dtype=dtype, device=DEVICE)
    bag_forward_triton(values, indices, weights, out=out)
    ref = embedding_bag_reference(values.double(), indices.long(), weights.double())
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "config", [{"BLOCK_L": 1, "BLOCK_D": 16, "num_warps": 1}, {"BLOCK_L": 8, "BLOCK_D": 64, "num_warps": 2}]
)
def test_forward_configs_tile_d_and_l(config):
    values, indices, weights, _ = make(40, 3, 11, 100, torch.float32)
    out = bag_forward_triton(values, indices, weights, config=config)
    assert rel_err(out, embedding_bag_reference(values, indices, weights)) < 1e-5


@pytest.mark.parametrize("backward", ["sorted", "atomics"])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 37), (torch.bfloat16, 100), (torch.float16, 1)])
def test_autograd_matches_reference(backward, sparse_grad, dtype, d):
    values, indices, weights, grad_out = make(60, 9, 6, d, dtype, torch.int32)
    ours = run(lambda v, i, w: embedding_bag_triton(v, i, w, sparse_grad, backward), values, indices, weights, grad_out)
    ref = run(lambda v, i, w: embedding_bag_reference(v, i.long(), w, sparse_grad), values, indices, weights, grad_out)
    assert ours[1].is_sparse == sparse_grad
    assert ours[1].dtype == dtype and ours[2].dtype == weights.dtype
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < TOL[dtype]
    if sparse_grad:
        assert torch.equal(ours[1].indices(), ref[1].indices())


def test_float64_matches_reference():
    values, indices, weights, grad_out = make(30, 5, 4, 19, torch.float64)
    ours = run(embedding_bag_triton, values, indices, weights, grad_out)
    ref = run(embedding_bag_reference, values, indices, weights, grad_out)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("backward,chunk_size", [("sorted", 4), ("sorted", None), ("atomics", None)])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_all_entries_on_one_row(backward, chunk_size, sparse_grad, chunk):
    """Heavy collision; chunks of 4 cut the row 23 times: carries summed over four levels."""
    if chunk_size:
        chunk(chunk_size)
    values, indices, weights, grad_out = make(20, 13, 7, 24, torch.float32)
    indices.fill_(3)
    ours = run(lambda v, i, w: embedding_bag_triton(v, i, w, sparse_grad, backward), values, indices, weights, grad_out)
    ref = run(lambda v, i, w: embedding_bag_reference(v, i, w, sparse_grad), values, indices, weights, grad_out)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5


def test_mixed_heavy_and_light_rows(chunk):
    chunk(4)
    _, indices, weights, grad_out = make(30, 11, 6, 33, torch.float32, seed=1)
    indices[:, :3] = 7  # row 7: 33 entries, the rest spread over 30 rows
    rows, row_grads = value_grad_triton(indices, weights, grad_out, 30, "sorted", sparse=True)
    ref_rows, ref_grads = value_row_grads(indices, weights, grad_out)
    assert torch.equal(rows, ref_rows)
    assert rel_err(row_grads, ref_grads) < 1e-5


@pytest.mark.parametrize("chunk_size,sparse_grad", [(5, True), (None, False)])
def test_fused_weight_grad_over_column_blocks_and_heavy_rows(chunk_size, sparse_grad, chunk, monkeypatch):
    """The sorted backward computes the weight gradient in its per-row pass: with rows of at most 256
    columns held whole, d=300 takes three blocks of 128 (each entry's dot summed over them); row 7 is
    cut by chunks of 5."""
    monkeypatch.setattr(triton_kernel, "MAX_BLOCK_D", 256)
    if chunk_size:
        chunk(chunk_size)
    values, indices, weights, grad_out = make(30, 11, 6, 300, torch.bfloat16, seed=3)
    indices[:, :3] = 7
    ours = run(lambda v, i, w: embedding_bag_triton(v, i, w, sparse_grad), values, indices, weights, grad_out)
    ref = run(lambda v, i, w: embedding_bag_reference(v, i, w, sparse_grad), values, indices, weights, grad_out)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-2
    exact = torch.einsum("tld,td->tl", values[indices].double(), grad_out.double())
    assert rel_err(ours[2], exact) < 1e-5  # fp32 accumulation of the bf16 products


@pytest.mark.parametrize("chunk_size,seed", [(4, 0), (5, 1)])
def test_sorted_backward_on_zipf_rows(chunk_size, seed, chunk):
    """Skewed reads (Zipf): rows of every length, cut by chunk borders anywhere, several carry levels,
    against the reference for both gradients, dense and sparse."""
    chunk(chunk_size)
    values, _, weights, grad_out = make(50, 11, 7, 40, torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, 51, dtype=torch.float64) ** 1.5
    indices = torch.multinomial(zipf, 11 * 7, replacement=True, generator=g).view(11, 7).to(DEVICE)
    for sparse in (False, True):
        ours = run(lambda v, i, w, s=sparse: embedding_bag_triton(v, i, w, s), values, indices, weights, grad_out)
        ref = run(lambda v, i, w, s=sparse: embedding_bag_reference(v, i, w, s), values, indices, weights, grad_out)
        for a, b in zip(ours, ref):
            assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("sparse", [False, True])
def test_sorted_backward_host_syncs(sparse, chunk, monkeypatch):
    """Rows of 9, 5 and 13 entries cut by chunks of 4: the dense gradient converts no tensor to a Python
    value (no host sync), the row-sparse one exactly once (its row count); both gradients match the
    reference, and nothing allocates a zero-filled (N, d) buffer (untouched rows are zeroed once)."""
    chunk(4)
    values, indices, weights, grad_out = make(40, 12, 5, 24, torch.float32, seed=4)
    flat = indices.view(-1)
    flat[:9], flat[9:14], flat[20:33] = 3, 5, 8
    conversions, zero_filled = [], []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _f=real, **k: conversions.append(_n) or _f(self, *a, **k)
        )
    for name in ("zeros", "zeros_like"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=real, **k: zero_filled.append(_f(*a, **k)) or zero_filled[-1])
    dv, dw = bag_backward_triton(values, indices, weights, grad_out, "sorted", sparse=sparse)
    monkeypatch.undo()
    assert conversions == (["__int__"] if sparse else [])
    assert all(t.numel() < values.numel() for t in zero_filled)
    ref_rows, ref_grads = value_row_grads(indices, weights, grad_out)
    if sparse:
        assert torch.equal(dv[0], ref_rows) and rel_err(dv[1], ref_grads) < 1e-5
    else:
        assert rel_err(dv, torch.zeros_like(values).index_copy_(0, ref_rows, ref_grads)) < 1e-5
    assert rel_err(dw, torch.einsum("tld,td->tl", values[indices].double(), grad_out.double())) < 1e-5


@pytest.mark.parametrize("backward", ["sorted", "atomics"])
def test_one_gradient_at_a_time(backward):
    values, indices, weights, grad_out = make(40, 7, 5, 37, torch.float32)
    fn = lambda v, i, w: embedding_bag_triton(v, i, w, False, backward)
    (dw,) = torch.autograd.grad(fn(values, indices, weights.requires_grad_()), weights, grad_out)
    (dv,) = torch.autograd.grad(fn(values.requires_grad_(), indices, weights.detach()), values, grad_out)
    ref = run(embedding_bag_reference, values.detach(), indices, weights.detach(), grad_out)
    assert rel_err(dv, ref[1]) < 1e-5 and rel_err(dw, ref[2]) < 1e-5


def test_sorted_is_bitwise_deterministic(chunk):
    chunk(6)
    _, indices, weights, grad_out = make(16, 10, 8, 40, torch.bfloat16, seed=2)
    indices[::2] = 5
    first = value_grad_triton(indices, weights, grad_out, 16, "sorted")
    second = value_grad_triton(indices, weights, grad_out, 16, "sorted")
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))
    values = torch.randn(16, 40, device=DEVICE).to(torch.bfloat16)
    both = [bag_backward_triton(values, indices, weights, grad_out) for _ in range(2)]
    assert torch.equal(both[0][0].view(torch.int16), both[1][0].view(torch.int16))
    assert torch.equal(both[0][1].view(torch.int32), both[1][1].view(torch.int32))


def test_weight_grad_overwrites_out():
    values, indices, _, grad_out = make(25, 6, 9, 300, torch.bfloat16)
    out = torch.full((6, 9), float("nan"), device=DEVICE)
    weight_grad_triton(values, indices, grad_out, out=out)
    ref = torch.einsum("tld,td->tl", values[indices].double(), grad_out.double())
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backward", ["sorted", "atomics"])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("T,L", [(0, 4), (3, 0)])
def test_empty_batch(backward, sparse_grad, T, L):
    values, indices, weights, grad_out = make(10, T, L, 8, torch.float32)
    out, dv, dw = run(
        lambda v, i, w: embedding_bag_triton(v, i, w, sparse_grad, backward), values, indices, weights, grad_out
    )
    assert out.shape == (T, 8) and not out.any()
    assert dv.shape == values.shape and not dv.to_dense().any()
    assert dw.shape == (T, L)


def test_single_entry_bags():
    values, indices, weights, grad_out = make(40, 9, 1, 37, torch.float32)
    ours = run(embedding_bag_triton, values, indices, weights, grad_out)
    ref = run(embedding_bag_reference, values, indices, weights, grad_out)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5


def test_noncontiguous_inputs():
    values, indices, weights, grad_out = make(40, 6, 5, 37, torch.float32)
    values = values.t().contiguous().t()  # column-major table
    indices, weights = indices.t().contiguous().t(), weights.t().contiguous().t()
    grad_out = grad_out[:1].expand(6, 37)
    ours = run(embedding_bag_triton, values, indices, weights, grad_out)
    ref = run(embedding_bag_reference, values, indices, weights, grad_out)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5


def test_rejects_unknown_backward():
    values, indices, weights, _ = make(4, 2, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="sorted"):
        embedding_bag_triton(values, indices, weights, backward="lock")
