"""Autograd for the Triton embedding bag: same signature and semantics as ``embedding_bag_reference``."""

import torch

from .triton_backward import bag_backward_triton
from .triton_forward import bag_forward_triton


class TritonEmbeddingBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights, sparse_grad: bool, algorithm: str):
        ctx.save_for_backward(values, indices, weights)
        ctx.sparse_grad = sparse_grad
        ctx.algorithm = algorithm
        return bag_forward_triton(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_values, grad_weights = bag_backward_triton(
            values, indices, weights, grad_out, ctx.algorithm, ctx.sparse_grad, need_values, need_weights
        )
        if need_values and ctx.sparse_grad:
            rows, row_grads = grad_values
            grad_values = torch.sparse_coo_tensor(
                rows.unsqueeze(0), row_grads, values.shape, is_coalesced=True, check_invariants=False
            )
        return grad_values, None, grad_weights, None, None


def embedding_bag_triton(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    backward: str = "sorted",
) -> torch.Tensor:
    """values (N, d), indices (T, L) int32/int64, weights (T, L) -> (T, d) in values.dtype.

    Differentiable in values and weights; fp32 accumulation (fp64 stays fp64). ``sparse_grad`` gives
    ``values`` a coalesced row-sparse COO gradient of the touched rows. ``backward`` picks the value
    gradient: ``"sorted"`` (deterministic segment sum) or ``"atomics"`` (fp32 atomic adds).
    Inputs are not validated here: ``memlayers.ops.embedding_bag`` does that before dispatching.
    """
    if backward not in ("sorted", "atomics"):
        raise ValueError(f"embedding_bag_triton: backward must be 'sorted' or 'atomics', got {backward!r}")
    return TritonEmbeddingBagFunction.apply(values, indices, weights, sparse_grad, backward)
