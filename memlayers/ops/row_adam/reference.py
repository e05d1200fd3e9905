"""Plain-PyTorch row-wise (lazy) Adam: the update of ``memlayers.optim.SparseRowAdam``.

Only the ``rows`` given change, in ``param`` and both moments; every other row stays bit-identical.
The math is ``torch.optim.SparseAdam``'s (bias correction from the global step count, eps added
after the square root), in float32, each result stored back in its tensor's dtype.
"""

import math

import torch

ROW_CHUNK_ELEMENTS = 1 << 24  # rows are updated in chunks of about this many elements (bounds the fp32 temporaries)


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """``lr * sqrt(1 - beta2**step) / (1 - beta1**step)``: both bias corrections folded into the step."""
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


@torch.no_grad()
def row_adam_reference(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    chunk_elements: int = ROW_CHUNK_ELEMENTS,
) -> None:
    """Adam on the rows ``rows`` of ``param``, in place.

    Args:
        param, exp_avg, exp_avg_sq: (N, d) tensors, updated in place (only rows in ``rows``).
        rows: (U,) int64 unique row ids in [0, N).
        grads: (U, d) gradient of those rows (``grads[i]`` belongs to ``rows[i]``).
        lr, beta1, beta2, eps: Adam hyper-parameters.
        step: the step count including this step (1 on the first step), for the bias correction.
        chunk_elements: rows are processed in chunks of about this many elements.

    Per row ``r`` with gradient ``g`` (all in fp32)::

        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        p = p - step_size * m / (sqrt(v) + eps),  step_size = adam_step_size(lr, beta1, beta2, step)
    """
    step_size = adam_step_size(lr, beta1, beta2, step)
    chunk = max(1, chunk_elements // max(1, param.shape[1]))
    for start in range(0, rows.numel(), chunk):
        r, g = rows[start : start + chunk], grads[start : start + chunk].float()
        m = exp_avg.index_select(0, r).float().lerp_(g, 1 - beta1)
        v = exp_avg_sq.index_select(0, r).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg.index_copy_(0, r, m.to(exp_avg.dtype))
        exp_avg_sq.index_copy_(0, r, v.to(exp_avg_sq.dtype))
        new = param.index_select(0, r).float().addcdiv_(m, v.sqrt_().add_(eps), value=-step_size)
        param.index_copy_(0, r, new.to(param.dtype))
