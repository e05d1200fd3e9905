"""UltraMem's cell scores (``memlayers.ops.tucker_cells``): the numba kernels (``cpu_cells.py``) against the reference,
both against autograd through the reference's forward, and the op's dispatch."""

import pytest
import torch
from conftest import count_calls, poison_allocations, rel_err

from memlayers.ops.tucker_cells import cell_scores, cell_scores_backward, tucker_cells

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
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, got_grads = cpu_cells.cell_scores_cpu(sr, sc, cores), cpu_cells.cell_scores_backward_cpu(sr, sc, cores, g)
    finally:
        torch.set_num_threads(old)
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert a.shape == b.shape and (rel_err(a, b) < 1e-5 if b.abs().sum() else torch.equal(a, b))


def test_cores_gradient_is_the_same_on_any_number_of_threads():
    cpu_cells = pytest.importorskip("memlayers.ops.tucker_cells.cpu_cells")
    sr, sc, cores, g = inputs(3000, 2, 2, 16, 2)
    runs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(cpu_cells.cell_scores_backward_cpu(sr, sc, cores, g))
        finally:
            torch.set_num_threads(old)
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
