"""Row-wise (lazy) Adam: Adam on a given set of rows of a parameter and its two moments, in place.

The update behind ``memlayers.optim.SparseRowAdam``. CUDA tensors go to the fused Triton kernel
(``triton_kernel.py``: one pass, no temporaries) when Triton is installed, everything else to the
plain-PyTorch reference (``reference.py``); both compute the same function (tested against each other).
"""

import torch

from ..dispatch import IMPLS, use_triton
from .reference import adam_step_size, row_adam_reference

__all__ = ["IMPLS", "adam_step_size", "row_adam_reference", "row_adam_update"]

# = triton_kernel.SUPPORTED_DTYPES, not imported from there: CPU installs need no Triton
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(param, exp_avg, exp_avg_sq, rows, grads, lr, beta1, beta2, eps, step) -> None:
    if param.dim() != 2:
        raise ValueError(f"row_adam_update: param must be a 2-D (N, d) table, got shape {tuple(param.shape)}")
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grads", grads)):
        if not t.is_floating_point():
            raise TypeError(f"row_adam_update: {name} must be floating point, got {t.dtype}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(
                f"row_adam_update: {name} shape {tuple(t.shape)} must equal param shape {tuple(param.shape)}"
            )
    if rows.dim() != 1:
        raise ValueError(f"row_adam_update: rows must be 1-D (U,), got shape {tuple(rows.shape)}")
    if rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"row_adam_update: rows must be int64 or int32, got {rows.dtype}")
    if grads.shape != (rows.shape[0], param.shape[1]):
        raise ValueError(
            f"row_adam_update: grads must be (U, d) = ({rows.shape[0]}, {param.shape[1]}) "
            f"for {rows.shape[0]} rows of width {param.shape[1]}, got {tuple(grads.shape)}"
        )
    if not (param.device == exp_avg.device == exp_avg_sq.device == rows.device == grads.device):
        raise ValueError(
            "row_adam_update: param, exp_avg, exp_avg_sq, rows and grads must be on one device, got "
            f"{param.device}, {exp_avg.device}, {exp_avg_sq.device}, {rows.device}, {grads.device}"
        )
    if not (lr >= 0 and eps > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(
            "row_adam_update: need lr >= 0, eps > 0 and betas in [0, 1), "
            f"got lr={lr}, eps={eps}, betas=({beta1}, {beta2})"
        )
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"row_adam_update: step must be an int >= 1 (the count including this step), got {step!r}")


def _triton_problem(param, exp_avg, exp_avg_sq, grads) -> str | None:
    """Why the kernel cannot take these tensors, or None."""
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grads", grads)):
        if t.dtype not in _TRITON_DTYPES:
            return f"{name} has dtype {t.dtype}; the kernel takes float32, bfloat16 and float16"
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            return f"{name} has column stride {t.stride(1)}; the kernel updates in place and needs unit column stride"
    return None


@torch.no_grad()
def row_adam_update(
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
    *,
    impl: str = "auto",
) -> None:
    """Adam on the rows ``rows`` of ``param`` and its moments, in place; other rows are untouched.

    Args:
        param: (N, d) float32/bfloat16/float16 table (other float dtypes: reference only).
        exp_avg, exp_avg_sq: (N, d) first and second moments, any float dtype (usually param's).
        rows: (U,) int64/int32 row ids, unique and in [0, N). Not checked (that would cost a device
            sync): with duplicates the kernel races, out-of-range ids write out of bounds.
        grads: (U, d) gradient of those rows; any float dtype.
        lr, beta1, beta2, eps: Adam hyper-parameters.
        step: step count including this one (1 on the first step), for the bias correction.
        impl: "auto" (Triton for CUDA tensors when Triton is installed and the kernel takes the
            dtypes/strides, else the reference), "reference", or "triton" (on CPU only under
            ``TRITON_INTERPRET=1``).

    Math (``torch.optim.SparseAdam``'s, in fp32, results stored in each tensor's dtype)::

        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g**2
        p -= lr * sqrt(1 - beta2**step) / (1 - beta1**step) * m / (sqrt(v) + eps)
    """
    if impl not in IMPLS:  # checked before the inputs: a typo should not read as a shape error
        raise ValueError(f"row_adam_update: impl must be one of {IMPLS}, got {impl!r}")
    _check_inputs(param, exp_avg, exp_avg_sq, rows, grads, lr, beta1, beta2, eps, step)
    if use_triton("row_adam_update", impl, param, _triton_problem(param, exp_avg, exp_avg_sq, grads)):
        from .triton_kernel import row_adam_triton  # imported lazily: CPU installs need no Triton

        row_adam_triton(param, exp_avg, exp_avg_sq, rows, grads, lr, beta1, beta2, eps, step)
    else:
        row_adam_reference(param, exp_avg, exp_avg_sq, rows.long(), grads, lr, beta1, beta2, eps, step)
