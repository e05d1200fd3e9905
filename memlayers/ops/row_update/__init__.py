"""Row-wise optimizer updates: Adam, row-wise Adagrad or SGD on a given set of rows of a (N, d)
parameter (and its state), in place.

The updates behind ``memlayers.optim``'s row-sparse optimizers (``SparseRowAdam``,
``SparseRowAdagrad``, ``SparseRowSGD``). CUDA tensors go to the fused Triton kernels
(``triton_kernel.py``: one pass, no temporaries) when Triton is installed, everything else to the
plain-PyTorch references (``reference.py``); both compute the same functions (tested against each other).
"""

import torch

from ..dispatch import IMPLS, use_triton
from .reference import adam_step_size, row_adagrad_reference, row_adam_reference, row_sgd_reference

__all__ = [
    "IMPLS",
    "adam_step_size",
    "row_adagrad_reference",
    "row_adagrad_update",
    "row_adam_reference",
    "row_adam_update",
    "row_sgd_reference",
    "row_sgd_update",
]

# = triton_kernel.SUPPORTED_DTYPES, not imported from there: CPU installs need no Triton
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(op: str, param, rows, grads, state: dict, lr: float) -> None:
    """Shapes, dtypes and devices shared by every update; ``state`` maps names to (N, d) moments,
    or, for ``sum_sq``, an (N,) per-row accumulator."""
    if param.dim() != 2:
        raise ValueError(f"{op}: param must be a 2-D (N, d) table, got shape {tuple(param.shape)}")
    for name, t in (("param", param), *state.items(), ("grads", grads)):
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    for name, t in state.items():
        want = tuple(param.shape[:1]) if name == "sum_sq" else tuple(param.shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} shape {tuple(t.shape)} must be {want} for param shape {tuple(param.shape)}")
    if rows.dim() != 1:
        raise ValueError(f"{op}: rows must be 1-D (U,), got shape {tuple(rows.shape)}")
    if rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: rows must be int64 or int32, got {rows.dtype}")
    if grads.shape != (rows.shape[0], param.shape[1]):
        raise ValueError(
            f"{op}: grads must be (U, d) = ({rows.shape[0]}, {param.shape[1]}) "
            f"for {rows.shape[0]} rows of width {param.shape[1]}, got {tuple(grads.shape)}"
        )
    tensors = {"param": param, **state, "rows": rows, "grads": grads}
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(
            f"{op}: {', '.join(tensors)} must be on one device, got "
            + ", ".join(str(t.device) for t in tensors.values())
        )
    if not lr >= 0:
        raise ValueError(f"{op}: need lr >= 0, got {lr}")


def triton_problem(param, state: dict, reads: dict) -> str | None:
    """Why the in-place row-update kernels (these and ``bag_update``'s) cannot take these tensors, or None.
    ``param`` and ``state`` are updated in place; ``reads`` ({name: tensor}) are only read."""
    for name, t in (("param", param), *state.items(), *reads.items()):
        if t.dtype not in _TRITON_DTYPES:
            return f"{name} has dtype {t.dtype}; the kernel takes float32, bfloat16 and float16"
    for name, t in (("param", param), *state.items()):
        if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
            return f"{name} has column stride {t.stride(1)}; the kernel updates in place and needs unit column stride"
        if t.dim() == 1 and t.shape[0] > 1 and t.stride(0) != 1:
            return f"{name} has stride {t.stride(0)}; the kernel updates in place and needs a contiguous accumulator"
    return None


def _use_kernel(op: str, impl: str, param, rows, grads, state: dict, lr: float) -> bool:
    """Check the inputs, then whether the Triton kernel runs (see ``memlayers.ops.dispatch``)."""
    if impl not in IMPLS:  # checked before the inputs: a typo should not read as a shape error
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    _check_inputs(op, param, rows, grads, state, lr)
    return use_triton(op, impl, param, triton_problem(param, state, {"grads": grads}))


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
    if not (eps > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"row_adam_update: need eps > 0 and betas in [0, 1), got eps={eps}, betas=({beta1}, {beta2})")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"row_adam_update: step must be an int >= 1 (the count including this step), got {step!r}")
    state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if _use_kernel("row_adam_update", impl, param, rows, grads, state, lr):
        from .triton_kernel import row_adam_triton  # imported lazily: CPU installs need no Triton

        row_adam_triton(param, exp_avg, exp_avg_sq, rows, grads, lr, beta1, beta2, eps, step)
    else:
        row_adam_reference(param, exp_avg, exp_avg_sq, rows.long(), grads, lr, beta1, beta2, eps, step)


@torch.no_grad()
def row_adagrad_update(
    param: torch.Tensor,
    sum_sq: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    eps: float,
    *,
    impl: str = "auto",
) -> None:
    """Row-wise Adagrad on the rows ``rows`` of ``param`` and their accumulators, in place.

    Args:
        param: (N, d) float32/bfloat16/float16 table (other float dtypes: reference only).
        sum_sq: (N,) per-row accumulator of mean squared gradients (keep it fp32: it only grows).
        rows, grads, impl: as in ``row_adam_update``.
        lr, eps: step size and the term added to the square root.

    Math (FBGEMM's "exact row-wise Adagrad", in fp32)::

        s = s + mean(g**2);  p -= lr * g / (sqrt(s) + eps)
    """
    if not eps > 0:
        raise ValueError(f"row_adagrad_update: need eps > 0, got {eps}")
    if _use_kernel("row_adagrad_update", impl, param, rows, grads, {"sum_sq": sum_sq}, lr):
        from .triton_kernel import row_adagrad_triton  # imported lazily: CPU installs need no Triton

        row_adagrad_triton(param, sum_sq, rows, grads, lr, eps)
    elif grads.numel():
        row_adagrad_reference(param, sum_sq, rows.long(), grads, lr, eps)


@torch.no_grad()
def row_sgd_update(
    param: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: float, *, impl: str = "auto"
) -> None:
    """SGD on the rows ``rows`` of ``param`` (N, d), in place: ``p -= lr * g`` in fp32.

    ``rows``, ``grads`` and ``impl`` as in ``row_adam_update``.
    """
    if _use_kernel("row_sgd_update", impl, param, rows, grads, {}, lr):
        from .triton_kernel import row_sgd_triton  # imported lazily: CPU installs need no Triton

        row_sgd_triton(param, rows, grads, lr)
    else:
        row_sgd_reference(param, rows.long(), grads, lr)
