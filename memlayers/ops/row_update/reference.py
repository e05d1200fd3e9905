"""Plain-PyTorch row-wise optimizer updates: the math of ``memlayers.optim``'s row-sparse optimizers.

Each function updates the given ``rows`` of a (N, d) parameter (and its optimizer state) in place;
every other row stays bit-identical. Arithmetic is float32, each result stored back in its tensor's
dtype. Rows are processed in chunks so the fp32 temporaries stay bounded whatever U is.

* Adam (lazy): ``torch.optim.SparseAdam``'s math (bias correction from the global step count, eps
  added after the square root), two (N, d) moments;
* row-wise Adagrad: one fp32 accumulator per row (N,) that sums the mean squared gradient of the
  row (FBGEMM's / DLRM's "exact row-wise Adagrad"): O(N) optimizer memory instead of Adam's O(N d);
* SGD: ``p -= lr * g``, no state.
"""

import math

import torch

ROW_CHUNK_ELEMENTS = 1 << 24  # rows are updated in chunks of about this many elements (bounds the fp32 temporaries)


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """``lr * sqrt(1 - beta2**step) / (1 - beta1**step)``: both bias corrections folded into the step."""
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


def _chunks(rows: torch.Tensor, grads: torch.Tensor, d: int, chunk_elements: int):
    """(rows, fp32 grads) in chunks of about ``chunk_elements`` elements."""
    chunk = max(1, chunk_elements // max(1, d))
    for start in range(0, rows.numel(), chunk):
        yield rows[start : start + chunk], grads[start : start + chunk].float()


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
    for r, g in _chunks(rows, grads, param.shape[1], chunk_elements):
        m = exp_avg.index_select(0, r).float().lerp_(g, 1 - beta1)
        v = exp_avg_sq.index_select(0, r).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg.index_copy_(0, r, m.to(exp_avg.dtype))
        exp_avg_sq.index_copy_(0, r, v.to(exp_avg_sq.dtype))
        new = param.index_select(0, r).float().addcdiv_(m, v.sqrt_().add_(eps), value=-step_size)
        param.index_copy_(0, r, new.to(param.dtype))


@torch.no_grad()
def row_adagrad_reference(
    param: torch.Tensor,
    sum_sq: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    eps: float,
    chunk_elements: int = ROW_CHUNK_ELEMENTS,
) -> None:
    """Row-wise Adagrad on the rows ``rows`` of ``param``, in place.

    Args:
        param: (N, d) table, updated in place (only rows in ``rows``).
        sum_sq: (N,) per-row accumulator (fp32 recommended), updated in place.
        rows: (U,) int64 unique row ids in [0, N).
        grads: (U, d) gradient of those rows.
        lr, eps: step size and the term added to the square root.

    Per row ``r`` with gradient ``g`` (in fp32)::

        s = s + mean(g * g);  p = p - lr * g / (sqrt(s) + eps)
    """
    for r, g in _chunks(rows, grads, param.shape[1], chunk_elements):
        s = sum_sq.index_select(0, r).float() + g.square().mean(1)
        sum_sq.index_copy_(0, r, s.to(sum_sq.dtype))
        new = param.index_select(0, r).float().addcdiv_(g, s.sqrt_().add_(eps)[:, None], value=-lr)
        param.index_copy_(0, r, new.to(param.dtype))


@torch.no_grad()
def row_sgd_reference(
    param: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: float, chunk_elements: int = ROW_CHUNK_ELEMENTS
) -> None:
    """SGD on the rows ``rows`` (U,) int64 unique of ``param`` (N, d), in place: ``p = p - lr * g`` in fp32."""
    for r, g in _chunks(rows, grads, param.shape[1], chunk_elements):
        new = param.index_select(0, r).float().add_(g, alpha=-lr)
        param.index_copy_(0, r, new.to(param.dtype))
