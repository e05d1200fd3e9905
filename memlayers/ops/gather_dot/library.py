"""``gather_dot`` as ``torch.library`` custom ops (``memlayers::gather_dot`` and its backward) for a dense
table gradient: one node each to ``torch.compile``, running the Triton kernel or the reference inside; eager calls
run the same functions without the dispatcher (``dispatch.eager_or_op``). A row-sparse table gradient keeps the
``autograd.Function`` path (``reference.GatherDotFunction``)."""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..dispatch import cpu_kernels, eager_or_op, use_cpu_kernel, use_triton
from ..embedding_bag import embedding_bag
from ..embedding_bag.library import dense_value_grad, entry_dots
from .reference import accumulation_dtype


def _gather_dot(table: Tensor, ids: Tensor, x: Tensor, impl: str) -> Tensor:
    """table (N, d), ids (T, L), x (T, d) -> (T, L) in the accumulation dtype."""
    if use_triton("gather_dot", impl, table):
        from .triton_kernel import gather_dot_triton

        return gather_dot_triton(table, ids, x)
    return entry_dots(table, ids.long(), x, impl=impl)  # the reference's forward, or its CPU kernel


gather_dot_op = torch.library.custom_op("memlayers::gather_dot", _gather_dot, mutates_args=())


@gather_dot_op.register_fake
def _(table, ids, x, impl):
    return x.new_empty(ids.shape, dtype=accumulation_dtype(table.dtype, x.dtype))


def _gather_dot_backward(
    table: Tensor, ids: Tensor, x: Tensor, grad_out: Tensor, impl: str, need_table: bool, need_x: bool
) -> tuple[Tensor, Tensor]:
    """(grad_table (N, d) in table.dtype or (0,), grad_x (T, d) in x.dtype or (0,) when not needed)."""
    none = x.new_empty(0)
    both = need_table and need_x and use_cpu_kernel(impl, grad_out, table, x)
    if both and (kernels := cpu_kernels("embedding_bag.cpu_bag_into")):  # two passes at once, one per thread
        return kernels.gather_dot_backward_cpu(table, ids.long(), x, grad_out)
    bag_impl = "triton" if use_triton("gather_dot", impl, table) else "reference"
    grad_x = embedding_bag(table, ids, grad_out, impl=bag_impl).to(x.dtype) if need_x else none
    grad_table = none
    if need_table:  # the bag's value gradient with weights grad_out and rows x
        grad_table = dense_value_grad(ids.long(), grad_out, x, table.shape[0], impl=impl).to(table.dtype)
    return grad_table, grad_x


gather_dot_backward = torch.library.custom_op("memlayers::gather_dot_backward", _gather_dot_backward, mutates_args=())


@gather_dot_backward.register_fake
def _(table, ids, x, grad_out, impl, need_table, need_x):
    none = x.new_empty(0)
    return (torch.empty_like(table) if need_table else none), (torch.empty_like(x) if need_x else none)


def _setup(ctx, inputs, output):
    table, ids, x, ctx.impl = inputs
    ctx.save_for_backward(table, ids, x)


def _backward_by(backward_fn):
    def backward(ctx, grad_out):
        table, ids, x = ctx.saved_tensors
        need_table, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_table, grad_x = backward_fn(table, ids, x, grad_out, ctx.impl, need_table, need_x)
        return (grad_table if need_table else None), None, (grad_x if need_x else None), None

    return backward


gather_dot_op.register_autograd(_backward_by(gather_dot_backward), setup_context=_setup)


class _EagerGatherDot(torch.autograd.Function):
    """The op's autograd without the dispatcher (``dispatch.eager_or_op``)."""

    @staticmethod
    def forward(ctx, table, ids, x, impl):
        _setup(ctx, (table, ids, x, impl), None)
        return _gather_dot(table, ids, x, impl)

    backward = staticmethod(once_differentiable(_backward_by(_gather_dot_backward)))


def gather_dot_dense(table: Tensor, ids: Tensor, x: Tensor, impl: str) -> Tensor:
    """table (N, d), ids (T, L), x (T, d) -> (T, L), with a dense table gradient: ``memlayers::gather_dot`` while
    ``torch.compile`` traces, the same function without the dispatcher otherwise."""
    return eager_or_op(gather_dot_op, _EagerGatherDot.apply)(table, ids, x, impl)
