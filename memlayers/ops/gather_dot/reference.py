"""Gathered dot products in plain PyTorch, with their autograd.

    out[t, l] = table[ids[t, l]] · x[t]

The forward is the embedding bag's weight gradient (``embedding_bag.reference.weight_grad``): one dot
product per (token, id), never the whole ``(T, L, d)`` gather. The gradients never gather either:

* ``grad_x[t] = sum_l grad_out[t, l] * table[ids[t, l]]`` is a weighted embedding bag over ``table``;
* ``grad_table[r] = sum_{(t, l): ids[t, l] = r} grad_out[t, l] * x[t]`` is the bag's value gradient
  with ``grad_out`` as the weights and ``x`` as the bag's output gradient (touched rows only, sorted, or
  the whole table).

Accumulation is in float32, float64 if either input is float64. The function the Triton kernel is
checked against: keep it simple and obviously right.
"""

import torch

from ..embedding_bag import embedding_bag
from ..embedding_bag.reference import value_grad, value_row_grads, weight_grad


def accumulation_dtype(table_dtype: torch.dtype, x_dtype: torch.dtype) -> torch.dtype:
    """float32 for 16/32-bit inputs, float64 if either is float64: the dtype of the output."""
    return torch.promote_types(torch.promote_types(table_dtype, x_dtype), torch.float32)


def gather_dot_forward(table: torch.Tensor, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table (N, d), ids (T, L) int64, x (T, d) -> (T, L) in the accumulation dtype: the bag's weight
    gradient, which is this function."""
    return weight_grad(table, ids, x)


def table_grad(ids: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, num_rows: int, sparse: bool):
    """Gradient of ``table``: ``(rows (U,) sorted unique int64, row_grads (U, d))`` if ``sparse``, else
    dense ``(num_rows, d)``; in the accumulation dtype of x. ids (T, L) int64, grad_out (T, L), x (T, d)."""
    if not sparse:
        return value_grad(ids, grad_out, x, num_rows)
    if ids.numel() == 0:
        return ids.new_zeros(0), x.new_zeros(0, x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
    return value_row_grads(ids, grad_out, x)


class GatherDotFunction(torch.autograd.Function):
    """Autograd of both paths. ``forward_fn`` (``gather_dot_forward`` or the Triton kernel's wrapper) computes
    the forward; ``bag_impl`` ("reference" or "triton") is the ``embedding_bag`` path of ``grad_x``."""

    @staticmethod
    def forward(ctx, table, ids, x, sparse_grad: bool, forward_fn, bag_impl: str):
        ctx.save_for_backward(table, ids, x)
        ctx.sparse_grad, ctx.bag_impl = sparse_grad, bag_impl
        return forward_fn(table, ids, x)

    @staticmethod
    def backward(ctx, grad_out):
        table, ids, x = ctx.saved_tensors
        grad_table = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_x = embedding_bag(table, ids, grad_out, impl=ctx.bag_impl).to(x.dtype)
        if ctx.needs_input_grad[0]:
            got = table_grad(ids.long(), grad_out, x, table.shape[0], ctx.sparse_grad)
            if ctx.sparse_grad:
                rows, row_grads = got
                grad_table = torch.sparse_coo_tensor(
                    rows.unsqueeze(0), row_grads.to(table.dtype), table.shape, is_coalesced=True, check_invariants=False
                )
            else:
                grad_table = got.to(table.dtype)
        return grad_table, None, grad_x, None, None, None


def gather_dot_reference(table, ids, x, sparse_grad: bool = False) -> torch.Tensor:
    """table (N, d), ids (T, L) int64, x (T, d) -> (T, L) float32 (float64 if an input is), differentiable
    in table and x (``sparse_grad``: table gets a row-sparse COO gradient of the touched rows)."""
    return GatherDotFunction.apply(table, ids, x, sparse_grad, gather_dot_forward, "reference")
