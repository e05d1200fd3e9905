"""The selections as ``torch.library`` custom ops: ``memlayers::product_key_select`` (sub-key scores in, flat ids
of the exact top k product keys out) and ``memlayers::tucker_select`` (UltraMem's). ``torch.compile`` sees one
node with a known output shape (the reference's data-dependent steps and the kernels stay inside), so a memory
layer traces whole. Eager calls run the same functions without the dispatcher (``dispatch.eager_or_op``)."""

import torch
from torch import Tensor

from ..dispatch import cpu_kernels, eager_or_op, use_cpu_kernel
from . import tucker
from .reference import product_key_select


def select(s1: Tensor, s2: Tensor, k: int, impl: str = "auto") -> Tensor:
    """s1, s2 (T, H, n) sub-key scores -> (T, H, k) int64 flat ids ``i*n + j``, best first, ties to the lower
    id. ``impl``: "triton" (the Triton selection, its default configuration), "reference" (plain torch), or
    "auto" (the numba kernel for float32 CPU scores, ``dispatch.use_cpu_kernel``, else the reference): the same ids
    every way."""
    return eager_or_op(select_op, _select)(s1, s2, k, impl)


def _select(s1: Tensor, s2: Tensor, k: int, impl: str = "auto") -> Tensor:
    if impl == "triton":
        from .triton_select import product_key_select_triton

        return product_key_select_triton(s1, s2, k)
    if use_cpu_kernel(impl, s1) and (kernels := cpu_kernels("product_key_topk.cpu_select")) is not None:
        return kernels.product_key_select_cpu(s1, s2, k)
    return product_key_select(s1, s2, k)


select_op = torch.library.custom_op("memlayers::product_key_select", _select, mutates_args=())


@select_op.register_fake
def _(s1, s2, k, impl="auto"):
    return s1.new_empty(*s1.shape[:2], k, dtype=torch.int64)


def tucker_select(
    s_row: Tensor, s_col: Tensor, u: Tensor, v: Tensor, core: Tensor, m: int, k: int, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tucker.tucker_select``: side scores (T, H, r, n), filter pair u, v (H, r), summed cores (H, r, r) -> rows and
    columns (T, H, k) int64, and their side scores (T, H, r, k). ``impl``: "reference", or "auto" (the numba kernel
    for float32 CPU side scores, else the reference)."""
    return eager_or_op(tucker_select_op, _tucker_select)(s_row, s_col, u, v, core, m, k, impl)


def _tucker_select(
    s_row: Tensor, s_col: Tensor, u: Tensor, v: Tensor, core: Tensor, m: int, k: int, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if use_cpu_kernel(impl, s_row, s_col) and (kernels := cpu_kernels("product_key_topk.cpu_select")):
        return kernels.tucker_select_cpu(s_row, s_col, u, v, core, m, k)
    return tucker.tucker_select(s_row, s_col, u, v, core, m, k)


tucker_select_op = torch.library.custom_op("memlayers::tucker_select", _tucker_select, mutates_args=())


@tucker_select_op.register_fake
def _(s_row, s_col, u, v, core, m, k, impl="auto"):
    ids = tuple(s_row.new_empty(*s_row.shape[:2], k, dtype=torch.int64) for _ in range(2))
    return *ids, *(s.new_empty(*s.shape[:3], k) for s in (s_row, s_col))
