"""Gathered dot products: ``out[t, l] = table[ids[t, l]] · x[t]`` (PEER's expert inputs ``u_j · x``).

The dot of each token with its own few rows of a large table, without the ``(T, L, d)`` gather. CUDA
tensors go to the Triton forward (``triton_kernel.py``) when Triton is installed, everything else to
the plain-PyTorch reference (``reference.py``); both compute the same function (tested against each
other) and share one backward: ``grad_x`` is a weighted embedding bag over ``table`` and ``grad_table``
the bag's value gradient, both through ``memlayers.ops.embedding_bag``'s code.
"""

import torch

from ..dispatch import full_precision, use_triton
from .library import gather_dot_dense
from .reference import GatherDotFunction, accumulation_dtype, gather_dot_forward, gather_dot_reference

__all__ = ["accumulation_dtype", "gather_dot", "gather_dot_reference"]


def _check_inputs(table: torch.Tensor, ids: torch.Tensor, x: torch.Tensor) -> None:
    if table.dim() != 2:
        raise ValueError(f"gather_dot: table must be a 2-D (N, d) table, got shape {tuple(table.shape)}")
    if not table.is_floating_point():
        raise TypeError(f"gather_dot: table must be floating point, got {table.dtype}")
    if ids.dim() != 2:
        raise ValueError(
            f"gather_dot: ids must be 2-D (tokens, L), got shape {tuple(ids.shape)}; "
            "flatten the trailing dimensions first, e.g. ids.reshape(ids.shape[0], -1)"
        )
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"gather_dot: ids must be int64 or int32, got {ids.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"gather_dot: x must be floating point, got {x.dtype}")
    if x.shape != (ids.shape[0], table.shape[1]):
        raise ValueError(
            f"gather_dot: x must be (T, d) = ({ids.shape[0]}, {table.shape[1]}) for ids of shape {tuple(ids.shape)} "
            f"and a table of width {table.shape[1]}, got {tuple(x.shape)}"
        )
    if not (table.device == ids.device == x.device):
        raise ValueError(
            "gather_dot: table, ids and x must be on one device, got "
            f"{table.device}, {ids.device}, {x.device}; move them with .to(table.device)"
        )


def gather_dot(
    table: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, sparse_grad: bool = False, *, impl: str = "auto"
) -> torch.Tensor:
    """Dot products of each token with the table rows it selects, never materialising ``(T, L, d)``.

    Args:
        table: (N, d) rows, fp32/fp16/bf16 (fp64 for gradcheck); differentiable.
        ids: (T, L) int64/int32 row ids in [0, N).
        x: (T, d) one vector per token, any float dtype (may differ from table's); differentiable.
        sparse_grad: give ``table`` a row-sparse COO gradient holding only the touched rows, sorted and
            unique (for ``memlayers.optim.SparseRowAdam``), instead of a dense (N, d) one.
        impl: "auto" (Triton for CUDA tensors when available, else the reference), "reference", or
            "triton" (on CPU only under ``TRITON_INTERPRET=1``).

    Returns:
        (T, L) ``out[t, l] = table[ids[t, l]] · x[t]``, accumulated and returned in float32 for 16/32-bit
        inputs, float64 if either input is float64 (these are pre-activations: keep their precision).
    """
    _check_inputs(table, ids, x)
    with full_precision(table.device):  # under autocast the reference's matmuls would run in bf16
        if not sparse_grad:  # a dense table gradient: the custom op torch.compile sees as one node
            use_triton("gather_dot", impl, table)  # an impl the inputs cannot take fails here, with its reason
            return gather_dot_dense(table, ids, x, impl)
        if use_triton("gather_dot", impl, table):
            from .triton_kernel import gather_dot_triton  # imported lazily: CPU installs need no Triton

            return GatherDotFunction.apply(table, ids, x, sparse_grad, gather_dot_triton, "triton")
        return GatherDotFunction.apply(table, ids.long(), x, sparse_grad, gather_dot_forward, "reference")
