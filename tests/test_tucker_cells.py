"""UltraMem's cell scores (``memlayers.ops.tucker_cells``): the numba kernels (``cpu_cells.py``) against the reference,
both against autograd through the reference's forward, and the op's dispatch."""

import pytest
import torch
from conftest import count_calls, poison_allocations, rel_err, torch_threads

from memlayers.ops.tucker_cells import cell_scores, cell_scores_backward, tucker_cells
from memlayers.ops.tucker_cells.reference import side_scores_backward

SHAPES = [(0, 2, 2, 4, 2), (1, 1, 1, 1, 1), (7, 3, 3, 5, 2), (300, 1, 2, 16, 1), (257, 2, 2, 16, 2), (40, 2, 2, 9, 3)]


def inputs(T, H, r, k, C, dtype=torch.float32):
    sr, sc = torch.randn(2, T, H, r, k, dtype=dtype).unbind(0)
    return sr, sc, torch.rand(C, H, r, r, dtype=dtype), torch.randn(T, H, C, k, dtype=dtype)


@pytest.mark.parametrize("T,H,r,k,C", SHAPES)
def test_reference_backward_is_autograds(T, H, r, k, C):
    sr, sc, cores, g = inputs(T, H, r, k, C, torch.float64)
    leaves = [x.clone().requires_grad_() for x in (sr, sc, cores)]
    want = torch.autograd.grad((cell_scores(*leaves) * g).sum(), leaves) if T else [torch.zeros_like(x) for x in leaves]
    for got, exp in zip(cell_scores_backward(sr, sc, cores, g), want):
        assert got.shape == exp.shape and got.is_contiguous()
        assert rel_err(got, exp) < 1e-12 if exp.abs().sum() else torch.equal(got, exp)


@pytest.mark.parametrize("T,H,r,k,C", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_match_reference(T, H, r, k, C, threads, monkeypatch):
    """Scores and gradients within float32 rounding of the reference's; every output written (allocations poisoned),
    1 and 2 threads."""
    cpu_cells = pytest.importorskip("memlayers.ops.tucker_cells.cpu_cells")
    sr, sc, cores, g = inputs(T, H, r, k, C)
    want, want_grads = cell_scores(sr, sc, cores), cell_scores_backward(sr, sc, cores, g)
    poison_allocations(monkeypatch)
    with torch_threads(threads):
        got, got_grads = cpu_cells.cell_scores_cpu(sr, sc, cores), cpu_cells.cell_scores_backward_cpu(sr, sc, cores, g)
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert a.shape == b.shape and (rel_err(a, b) < 1e-5 if b.abs().sum() else torch.equal(a, b))


def test_cores_gradient_is_the_same_on_any_number_of_threads():
    cpu_cells = pytest.importorskip("memlayers.ops.tucker_cells.cpu_cells")
    sr, sc, cores, g = inputs(3000, 2, 2, 16, 2)
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            runs.append(cpu_cells.cell_scores_backward_cpu(sr, sc, cores, g))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_kernels_refuse_shapes_they_cannot_read():
    cpu_cells = pytest.importorskip("memlayers.ops.tucker_cells.cpu_cells")
    sr, sc, cores, g = inputs(5, 2, 2, 4, 2)
    with pytest.raises(ValueError, match="need sr, sc"):
        cpu_cells.cell_scores_cpu(sr, sc[:, :1], cores)
    with pytest.raises(ValueError, match="need sr, sc"):
        cpu_cells.cell_scores_cpu(sr, sc, cores[:, :, :1])
    with pytest.raises(ValueError, match="does not fit"):
        cpu_cells.cell_scores_backward_cpu(sr, sc, cores, g[:, :, :1])


def test_op_dispatch_and_gradients(monkeypatch):
    """float32 CPU tensors above the size threshold run the kernels (``MEMLAYERS_CPU_KERNELS=0``: the reference), with
    the same scores and gradients either way; impl "reference" always runs the reference."""
    pytest.importorskip("numba")
    calls = count_calls(monkeypatch, "memlayers.ops.tucker_cells.cpu_cells", "cell_scores_cpu")
    sr, sc, cores, g = inputs(2100, 2, 2, 4, 2)  # 33,600 side scores: above CPU_KERNEL_MIN_ELEMENTS
    runs = []
    for impl, env in (("auto", "1"), ("auto", "0"), ("reference", "1")):
        monkeypatch.setenv("MEMLAYERS_CPU_KERNELS", env)
        leaves = [x.clone().requires_grad_() for x in (sr, sc, cores)]
        out = tucker_cells(*leaves, impl=impl)
        runs.append((out, *torch.autograd.grad((out * g).sum(), leaves)))
    assert calls == [1]
    for run in runs[1:]:
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(runs[0], run))
    with pytest.raises(ValueError, match="impl must be"):
        tucker_cells(sr, sc, cores, impl="triton")


def sides(T, H, Q, r, n, d, k, dtype=torch.float32):
    q, keys = torch.randn(T, H, Q, 2, d, dtype=dtype), torch.randn(H, 2, r, n, d, dtype=dtype)
    i, j = torch.randint(0, n, (2, T, H, k)).unbind(0)
    return q, keys, i, j, *torch.randn(2, T, H, r, k, dtype=dtype).unbind(0)


def side_scores(q, keys, i, j):
    """The definition: sr[t, h, a, k] = q[t, h, a // (r / Q), 0] · keys[h, 0, a, i[t, h, k]] (sc: side 1, j)."""
    r, Q = keys.shape[2], q.shape[2]
    out = []
    for side, chosen in ((0, i), (1, j)):
        qs = q[:, :, torch.arange(r) // (r // Q), side]  # (T, H, r, d)
        rows = keys[:, side][torch.arange(keys.shape[0]).view(1, -1, 1, 1), torch.arange(r).view(1, 1, -1, 1),
                             chosen.unsqueeze(2)]  # (T, H, r, k, d)  # fmt: skip
        out.append((qs.unsqueeze(3) * rows).sum(-1))
    return out


SIDE_SHAPES = [(0, 2, 1, 2, 8, 4, 3), (1, 1, 1, 1, 1, 1, 1), (9, 2, 2, 2, 7, 5, 4), (300, 1, 2, 2, 112, 16, 16),
               (200, 2, 1, 2, 40, 32, 16), (30, 3, 3, 3, 11, 6, 5)]  # fmt: skip


@pytest.mark.parametrize("T,H,Q,r,n,d,k", SIDE_SHAPES)
def test_side_scores_backward_reference_is_autograds(T, H, Q, r, n, d, k):
    q, keys, i, j, g_row, g_col = sides(T, H, Q, r, n, d, k, torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, keys)]
    sr, sc = side_scores(*leaves, i, j)
    want = (
        torch.autograd.grad((sr * g_row).sum() + (sc * g_col).sum(), leaves)
        if T
        else [torch.zeros_like(q), torch.zeros_like(keys)]
    )
    for got, exp in zip(side_scores_backward(q, keys, i, j, g_row, g_col), want):
        assert got.shape == exp.shape and (rel_err(got, exp) < 1e-12 if exp.abs().sum() else torch.equal(got, exp))


@pytest.mark.parametrize("T,H,Q,r,n,d,k", SIDE_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_side_scores_backward_kernel_matches_reference(T, H, Q, r, n, d, k, threads, monkeypatch):
    cpu_cells = pytest.importorskip("memlayers.ops.tucker_cells.cpu_cells")
    args = sides(T, H, Q, r, n, d, k)
    want = side_scores_backward(*args)
    poison_allocations(monkeypatch)
    with torch_threads(threads):
        got = cpu_cells.side_scores_backward_cpu(*args)
    for a, b in zip(got, want):
        assert a.shape == b.shape and (rel_err(a, b) < 1e-5 if b.abs().sum() else torch.equal(a, b))


def test_side_scores_backward_kernel_refuses_what_it_cannot_read():
    cpu_cells = pytest.importorskip("memlayers.ops.tucker_cells.cpu_cells")
    q, keys, i, j, g_row, g_col = sides(5, 2, 1, 2, 8, 4, 3)
    with pytest.raises(ValueError, match="need q"):
        cpu_cells.side_scores_backward_cpu(q, keys[:1], i, j, g_row, g_col)
    with pytest.raises(ValueError, match="need q"):
        cpu_cells.side_scores_backward_cpu(q, keys, i, j, g_row[:, :, :1], g_col)
    j[2, 1, 0] = 8
    with pytest.raises(IndexError, match=r"j must be in \[0, 8\)"):
        cpu_cells.side_scores_backward_cpu(q, keys, i, j, g_row, g_col)


def test_side_scores_backward_kernel_refuses_chosen_ids_of_another_batch():
    cpu_cells = pytest.importorskip("memlayers.ops.tucker_cells.cpu_cells")
    q, keys, i, j, g_row, g_col = sides(6, 2, 1, 2, 8, 4, 3)
    with pytest.raises(ValueError, match="need q"):
        cpu_cells.side_scores_backward_cpu(q, keys, i[:1], j[:1], g_row, g_col)


def test_kernels_give_the_same_floats_on_one_and_two_threads():
    cpu_cells = pytest.importorskip("memlayers.ops.tucker_cells.cpu_cells")
    cells, side_args = inputs(3000, 2, 2, 16, 2), sides(3000, 2, 2, 2, 40, 16, 16)
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            runs.append((cpu_cells.cell_scores_cpu(*cells[:3]), *cpu_cells.side_scores_backward_cpu(*side_args)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
