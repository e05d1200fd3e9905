"""Gradient clipping with the value tables clipped apart from the rest."""

import torch
from torch import nn

from .groups import value_parameters
from .row_sparse import row_sparse_grad


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The total 2-norm of ``params``' gradients, in one process."""
    norms = []
    for p in params:
        if p.grad.is_sparse:  # rows read by several layers of a shared pool must be summed first
            norms.append(torch.linalg.vector_norm(row_sparse_grad(p)[1].float()))
        else:
            norms.append(torch.linalg.vector_norm(p.grad.float()))
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@torch.no_grad()
def clip_grad_norms(model: nn.Module, max_norm: float | None = 1.0, value_max_norm: float | None = 1.0, norm_fn=None):
    """Clip value-table gradients and all other gradients separately (each to its own total norm).

    Handles sparse value gradients. ``None`` skips clipping that part (its norm is still returned).
    ``norm_fn(params)``: the total norm of their gradients (on many processes ``Parallel.grad_norm``, the
    global one). Returns (norm of the other gradients, norm of the value gradients), before clipping, as tensors.
    """
    values = [p for p in value_parameters(model) if p.grad is not None]
    value_ids = {id(p) for p in values}
    out = []
    for part, limit in (
        ([p for p in model.parameters() if p.grad is not None and id(p) not in value_ids], max_norm),
        (values, value_max_norm),
    ):
        norm = (norm_fn or grad_norm)(part)
        if limit is not None and part:
            scale = (limit / (norm + 1e-6)).clamp(max=1.0)
            for p in part:  # a sparse gradient's values in place: mul_ on it would drop its coalesced flag
                grad = p.grad._values() if p.grad.is_sparse else p.grad
                grad = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 shard: its local part
                grad.mul_(scale.to(grad.dtype))
        out.append(norm)
    return tuple(out)
