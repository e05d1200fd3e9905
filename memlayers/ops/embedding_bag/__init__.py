"""Weighted embedding bag: ``out[t] = sum_l weights[t, l] * values[indices[t, l]]``.

CUDA tensors go to the Triton kernels (``triton_*.py``) when Triton is installed, everything else
to the plain-PyTorch reference; both compute the same function (tested against each other).
"""

import torch

from ..dispatch import use_triton
from . import library
from .naive import embedding_bag_naive
from .reference import embedding_bag_reference
from .sink import SinkBagFunction

__all__ = ["embedding_bag", "embedding_bag_naive", "embedding_bag_reference"]


def _check_bags(indices: torch.Tensor, bags: torch.Tensor | None, num_bags: int | None) -> None:
    if bags is None:
        if num_bags is not None:
            raise ValueError("embedding_bag: num_bags is for keyed bags; pass bags too, or leave num_bags None")
        return
    if bags.shape != indices.shape:
        raise ValueError(
            f"embedding_bag: bags shape {tuple(bags.shape)} must equal indices shape {tuple(indices.shape)}"
        )
    if bags.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding_bag: bags must be int64 or int32, got {bags.dtype}")
    if bags.device != indices.device:
        raise ValueError(f"embedding_bag: bags must be on the indices' device {indices.device}, got {bags.device}")
    if not isinstance(num_bags, int) or num_bags < 0:
        raise ValueError(f"embedding_bag: keyed bags need num_bags, an int >= 0 (the output rows), got {num_bags!r}")


def _check_inputs(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    if values.dim() != 2:
        raise ValueError(f"embedding_bag: values must be a 2-D (N, d) table, got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"embedding_bag: values must be floating point, got {values.dtype}")
    if indices.dim() != 2:
        raise ValueError(
            f"embedding_bag: indices must be 2-D (tokens, bag), got shape {tuple(indices.shape)}; "
            "flatten leading dimensions first, e.g. indices.reshape(-1, indices.shape[-1])"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding_bag: indices must be int64 or int32, got {indices.dtype}")
    if weights.shape != indices.shape:
        raise ValueError(
            f"embedding_bag: weights shape {tuple(weights.shape)} must equal indices shape {tuple(indices.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"embedding_bag: weights must be floating point, got {weights.dtype}")
    if not (values.device == indices.device == weights.device):
        raise ValueError(
            "embedding_bag: values, indices and weights must be on one device, got "
            f"{values.device}, {indices.device}, {weights.device}; move them with .to(values.device)"
        )


BACKWARDS = ("sorted", "atomics")


def embedding_bag(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    *,
    impl: str = "auto",
    backward: str = "sorted",
    value_grad_sink=None,
    bags: torch.Tensor | None = None,
    num_bags: int | None = None,
) -> torch.Tensor:
    """Weighted sum of value rows per token, never materialising ``(T, L, d)``.

    Args:
        values: (N, d) table, fp32/fp16/bf16 (fp64 for gradcheck).
        indices: (T, L) int64/int32 row ids in [0, N).
        weights: (T, L) floating weights; differentiable.
        sparse_grad: give ``values`` a row-sparse COO gradient holding only touched rows
            (for ``memlayers.optim.SparseRowAdam`` or ``torch.optim.SparseAdam``) instead of a dense (N, d) one.
        impl: "auto" (Triton for CUDA tensors when available, else the reference), "reference",
            or "triton" (on CPU only under ``TRITON_INTERPRET=1``).
        backward: Triton value-gradient algorithm: "sorted" (deterministic segment sum) or
            "atomics" (fp32 atomic adds, not deterministic).
        value_grad_sink: ``sink(indices, weights, grad_out)``, called in the backward instead of making a value
            gradient (``values`` gets an empty row-sparse one): the fused optimizer update
            (``memlayers.optim.FusedRowOptimizer``). None: the usual gradient.
        bags, num_bags: *keyed* bags: entry (t, l) is added into output row ``bags[t, l]`` (T, L) int64/int32
            in [0, num_bags) instead of row t (several output rows per token, each row read once; e.g. the
            implicit value expansion's per-block sums). The reference only (also on CUDA); no value_grad_sink.

    Returns:
        (T, d) in ``values.dtype`` ((num_bags, d) keyed), accumulated in float32.
    """
    _check_inputs(values, indices, weights)
    _check_bags(indices, bags, num_bags)
    if backward not in BACKWARDS:
        raise ValueError(f"embedding_bag: backward must be one of {BACKWARDS}, got {backward!r}")
    if value_grad_sink is not None and torch.is_grad_enabled() and values.requires_grad:
        if bags is not None:
            raise ValueError("embedding_bag: keyed bags take no value_grad_sink (no fused update); leave it None")
        return SinkBagFunction.apply(values, indices, weights, value_grad_sink, impl)
    triton = use_triton("embedding_bag", impl, values, None if bags is None else library.KEYED_BAGS_ON_TRITON)
    if not sparse_grad:  # dense gradients: the custom op torch.compile sees as one node
        return library.bag(values, indices, weights, impl, backward, bags, num_bags or 0)
    if triton:
        from .triton_autograd import embedding_bag_triton  # imported lazily: CPU installs need no Triton

        return embedding_bag_triton(values, indices, weights, sparse_grad, backward)
    return embedding_bag_reference(values, indices.long(), weights, sparse_grad, bags, num_bags or 0)
