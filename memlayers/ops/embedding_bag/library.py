"""The bag as ``torch.library`` custom ops, ``memlayers::bag`` and ``memlayers::bag_backward``, for dense
value gradients: ``torch.compile`` sees each as one node with known output shapes (``fullgraph=True``, CUDA
graphs), while each runs the Triton kernels or the reference inside, as ``embedding_bag`` dispatches; eager calls
run the same functions without the dispatcher (``dispatch.eager_or_op``).

Row-sparse value gradients and the fused update (gradients of data-dependent size, or none) keep their
``autograd.Function`` path: ``torch.compile`` breaks the graph there."""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..dispatch import cpu_kernels, eager_or_op, use_cpu_kernel, use_triton
from .reference import bag_forward, value_grad, weight_grad

KEYED_BAGS_ON_TRITON = "keyed bags (bags=...) have no Triton kernel"


def dense_value_grad(
    indices: Tensor, weights: Tensor, grad_out: Tensor, num_rows: int, bags: Tensor | None = None, impl: str = "auto"
) -> Tensor:
    """``reference.value_grad`` (indices (T, L) int64, weights (T, L), grad_out (T, d) -> (num_rows, d)), by the numba
    kernel (``cpu_bag_into.py``) for float32 CPU gradients under impl "auto"."""
    if use_cpu_kernel(impl, weights, grad_out) and (kernels := cpu_kernels("embedding_bag.cpu_bag_into")):
        return kernels.value_grad_cpu(indices, weights, grad_out, num_rows, bags)
    return value_grad(indices, weights, grad_out, num_rows, bags)


def entry_dots(table: Tensor, indices: Tensor, x: Tensor, bags: Tensor | None = None, impl: str = "auto") -> Tensor:
    """``reference.weight_grad`` (table (N, d), indices (T, L) int64, x (T, d) or keyed (num_bags, d) -> (T, L)
    ``table[indices[t, l]] · x[t or bags[t, l]]``), by the numba kernel (``cpu_dots.py``) for float32 CPU tensors
    under impl "auto": the bag's weight gradient and ``gather_dot``'s forward."""
    if use_cpu_kernel(impl, x, table) and (kernels := cpu_kernels("embedding_bag.cpu_dots")):
        return kernels.dots_cpu(table, indices, x, bags)
    return weight_grad(table, indices, x, bags)


def _triton(impl: str, values: Tensor, bags: Tensor | None) -> bool:
    return use_triton("embedding_bag", impl, values, None if bags is None else KEYED_BAGS_ON_TRITON)


def _bag(
    values: Tensor, indices: Tensor, weights: Tensor, impl: str, algorithm: str, bags: Tensor | None = None,
    num_bags: int = 0,
) -> Tensor:  # fmt: skip
    """values (N, d), indices (T, L), weights (T, L) -> (T, d) in values.dtype ((num_bags, d) keyed by bags)."""
    if _triton(impl, values, bags):
        from .triton_forward import bag_forward_triton

        return bag_forward_triton(values, indices, weights)
    if (
        bags is not None
        and use_cpu_kernel(impl, weights, values)
        and (kernels := cpu_kernels("embedding_bag.cpu_bag_into"))
    ):
        return kernels.keyed_bag_cpu(values, indices.long(), weights, bags.long(), num_bags)
    return bag_forward(values, indices.long(), weights, bags, num_bags)


bag_op = torch.library.custom_op("memlayers::bag", _bag, mutates_args=())


@bag_op.register_fake
def _(values, indices, weights, impl, algorithm, bags=None, num_bags=0):
    return values.new_empty(indices.shape[0] if bags is None else num_bags, values.shape[1])


def _bag_backward(
    values: Tensor, indices: Tensor, weights: Tensor, grad_out: Tensor, impl: str, algorithm: str,
    need_values: bool, need_weights: bool, bags: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Dense gradients: (dV (N, d) in values.dtype or (0,), dw (T, L) in weights.dtype or (0,) when not needed)."""
    none = values.new_empty(0)
    if _triton(impl, values, bags):
        from .triton_backward import bag_backward_triton

        dv, dw = bag_backward_triton(values, indices, weights, grad_out, algorithm, False, need_values, need_weights)
        return (none if dv is None else dv), (none if dw is None else dw)
    indices = indices.long()
    dv = dw = none
    if need_weights and need_values and use_cpu_kernel(impl, weights, grad_out, values):  # both at once, one a thread
        if kernels := cpu_kernels("embedding_bag.cpu_bag_into"):
            return kernels.bag_backward_cpu(values, indices, weights, grad_out, bags)
    if need_weights:
        dw = entry_dots(values, indices, grad_out, bags, impl).to(weights.dtype)
    if need_values:
        dv = dense_value_grad(indices, weights, grad_out, values.shape[0], bags, impl).to(values.dtype)
    return dv, dw


bag_backward = torch.library.custom_op("memlayers::bag_backward", _bag_backward, mutates_args=())


@bag_backward.register_fake
def _(values, indices, weights, grad_out, impl, algorithm, need_values, need_weights, bags=None):
    none = values.new_empty(0)
    # contiguous, as the real outputs are (empty_like would keep a permuted input's strides)
    return (values.new_empty(values.shape) if need_values else none), (
        weights.new_empty(weights.shape) if need_weights else none
    )


def _setup(ctx, inputs, output):
    values, indices, weights, ctx.impl, ctx.algorithm, bags, _ = inputs
    ctx.save_for_backward(values, indices, weights, bags)


def _backward_by(backward_fn):
    def backward(ctx, grad_out):
        values, indices, weights, bags = ctx.saved_tensors
        need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dv, dw = backward_fn(
            values, indices, weights, grad_out, ctx.impl, ctx.algorithm, need_values, need_weights, bags
        )
        return (dv if need_values else None), None, (dw if need_weights else None), None, None, None, None

    return backward


bag_op.register_autograd(_backward_by(bag_backward), setup_context=_setup)


class _EagerBag(torch.autograd.Function):
    """The op's autograd without the dispatcher (``dispatch.eager_or_op``)."""

    @staticmethod
    def forward(ctx, values, indices, weights, impl, algorithm, bags, num_bags):
        _setup(ctx, (values, indices, weights, impl, algorithm, bags, num_bags), None)
        return _bag(values, indices, weights, impl, algorithm, bags, num_bags)

    backward = staticmethod(once_differentiable(_backward_by(_bag_backward)))


def bag(
    values: Tensor, indices: Tensor, weights: Tensor, impl: str, algorithm: str, bags: Tensor | None = None,
    num_bags: int = 0,
) -> Tensor:  # fmt: skip
    """values (N, d), indices (T, L), weights (T, L) -> (T, d) in values.dtype ((num_bags, d) keyed by bags), with
    dense gradients: ``memlayers::bag`` while ``torch.compile`` traces, the same function without the dispatcher
    otherwise."""
    return eager_or_op(bag_op, _EagerBag.apply)(values, indices, weights, impl, algorithm, bags, num_bags)
