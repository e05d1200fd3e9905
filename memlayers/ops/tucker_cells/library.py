"""``memlayers::tucker_cells`` and its backward as ``torch.library`` custom ops: one node each to ``torch.compile``,
running the numba kernels for float32 CPU tensors under impl "auto", else the reference."""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..dispatch import cpu_kernels, eager_or_op, use_cpu_kernel
from .reference import cell_scores, cell_scores_backward, side_scores_backward


def _tucker_cells(sr: Tensor, sc: Tensor, cores: Tensor, impl: str) -> Tensor:
    """sr, sc (T, H, r, k), cores (C, H, r, r) -> (T, H, C, k) in sr's dtype."""
    if use_cpu_kernel(impl, sr, sc, cores) and (kernels := cpu_kernels("tucker_cells.cpu_cells")):
        return kernels.cell_scores_cpu(sr, sc, cores)
    return cell_scores(sr, sc, cores)


tucker_cells_op = torch.library.custom_op("memlayers::tucker_cells", _tucker_cells, mutates_args=())


@tucker_cells_op.register_fake
def _(sr, sc, cores, impl):
    return sr.new_empty(sr.shape[0], sr.shape[1], cores.shape[0], sr.shape[3])


def _tucker_cells_backward(
    sr: Tensor, sc: Tensor, cores: Tensor, grad: Tensor, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(d sr, d sc (T, H, r, k), d cores (C, H, r, r))."""
    if use_cpu_kernel(impl, grad, sr, sc, cores) and (kernels := cpu_kernels("tucker_cells.cpu_cells")):
        return kernels.cell_scores_backward_cpu(sr, sc, cores, grad)
    return cell_scores_backward(sr, sc, cores, grad)


tucker_cells_backward = torch.library.custom_op(
    "memlayers::tucker_cells_backward", _tucker_cells_backward, mutates_args=()
)


@tucker_cells_backward.register_fake
def _(sr, sc, cores, grad, impl):
    return sr.new_empty(sr.shape), sc.new_empty(sc.shape), cores.new_empty(cores.shape)


def _setup(ctx, inputs, output):
    sr, sc, cores, ctx.impl = inputs
    ctx.save_for_backward(sr, sc, cores)


def _backward(ctx, grad):
    sr, sc, cores = ctx.saved_tensors
    d_sr, d_sc, d_cores = tucker_cells_backward(sr, sc, cores, grad.contiguous(), ctx.impl)
    return d_sr, d_sc, d_cores, None


tucker_cells_op.register_autograd(_backward, setup_context=_setup)


class _EagerCells(torch.autograd.Function):
    """The op's autograd without the dispatcher (``dispatch.eager_or_op``)."""

    @staticmethod
    def forward(ctx, sr, sc, cores, impl):
        ctx.save_for_backward(sr, sc, cores)
        ctx.impl = impl
        return _tucker_cells(sr, sc, cores, impl)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return *_tucker_cells_backward(*ctx.saved_tensors, grad.contiguous(), ctx.impl), None


def tucker_cells(sr: Tensor, sc: Tensor, cores: Tensor, impl: str = "auto") -> Tensor:
    """sr, sc (T, H, r, k): each selected slot's row and column side scores; cores (C, H, r, r) -> scores (T, H, C, k),
    ``Σ_a Σ_b sr[a] cores[c, h, a, b] sc[b]`` (``reference.cell_scores``). impl: "auto" (the numba kernels for float32
    CPU tensors, else the reference) or "reference"."""
    if impl not in ("auto", "reference"):
        raise ValueError(f"tucker_cells: impl must be 'auto' or 'reference', got {impl!r}")
    return eager_or_op(tucker_cells_op, _EagerCells.apply)(sr, sc, cores.to(sr.dtype), impl)


def tucker_sides_backward(
    q: Tensor, keys: Tensor, i: Tensor, j: Tensor, g_row: Tensor, g_col: Tensor, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """``reference.side_scores_backward`` -> (dq, dkeys): the numba kernel for float32 CPU tensors under impl "auto",
    else the reference's ``gather_dot`` backward on its own dispatch (Triton on CUDA)."""
    return eager_or_op(tucker_sides_backward_op, _tucker_sides_backward)(q, keys, i, j, g_row, g_col, impl)


def _tucker_sides_backward(
    q: Tensor, keys: Tensor, i: Tensor, j: Tensor, g_row: Tensor, g_col: Tensor, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    if use_cpu_kernel(impl, g_row, q, keys) and (kernels := cpu_kernels("tucker_cells.cpu_cells")):
        return kernels.side_scores_backward_cpu(q, keys, i, j, g_row, g_col)
    return side_scores_backward(q, keys, i, j, g_row, g_col, impl)


tucker_sides_backward_op = torch.library.custom_op(
    "memlayers::tucker_sides_backward", _tucker_sides_backward, mutates_args=()
)


@tucker_sides_backward_op.register_fake
def _(q, keys, i, j, g_row, g_col, impl="auto"):
    return q.new_empty(q.shape), keys.new_empty(keys.shape)
