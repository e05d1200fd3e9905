"""The selections as ``torch.library`` custom ops: ``memlayers::product_key_select`` (sub-key scores in, flat ids
of the exact top k product keys out) and ``memlayers::tucker_select`` (UltraMem's). ``torch.compile`` sees one
node with a known output shape (the reference's data-dependent steps and the kernels stay inside), so a memory
layer traces whole."""

import functools
import importlib.util
import os
import warnings

import torch
from torch import Tensor

from . import tucker
from .reference import product_key_select

CPU_KERNELS_ENV = "MEMLAYERS_CPU_KERNELS"  # "0": no numba kernel, the reference on CPU


def cpu_kernel_usable(s1: Tensor) -> bool:
    """Whether the numba selections (``cpu_select.py``) take these scores: float32 on the CPU, numba installed,
    ``MEMLAYERS_CPU_KERNELS`` not "0"."""
    return (
        s1.device.type == "cpu"
        and s1.dtype == torch.float32
        and os.environ.get(CPU_KERNELS_ENV, "1") != "0"
        and importlib.util.find_spec("numba") is not None
    )


@torch.library.custom_op("memlayers::product_key_select", mutates_args=())
def select(s1: Tensor, s2: Tensor, k: int, impl: str = "auto") -> Tensor:
    """s1, s2 (T, H, n) sub-key scores -> (T, H, k) int64 flat ids ``i*n + j``, best first, ties to the lower
    id. ``impl``: "triton" (the Triton selection, its default configuration), "reference" (plain torch), or
    "auto" (the numba kernel where ``cpu_kernel_usable``, else the reference): the same ids every way."""
    if impl == "triton":
        from .triton_select import product_key_select_triton

        return product_key_select_triton(s1, s2, k)
    if impl == "auto" and cpu_kernel_usable(s1) and (kernel := _cpu_kernel()) is not None:
        return kernel.product_key_select_cpu(s1, s2, k)
    return product_key_select(s1, s2, k)


@functools.cache
def _cpu_kernel():
    """The ``cpu_select`` module, or None (warned once) when numba is installed but does not import."""
    try:
        from . import cpu_select
    except ImportError as e:
        warnings.warn(f"memlayers: numba is installed but does not import ({e}); the CPU selection runs its "
                      f"plain-torch reference (the same ids, slower). Set {CPU_KERNELS_ENV}=0 to silence this.")  # fmt: skip
        return None
    return cpu_select


@select.register_fake
def _(s1, s2, k, impl="auto"):
    return s1.new_empty(*s1.shape[:2], k, dtype=torch.int64)


@torch.library.custom_op("memlayers::tucker_select", mutates_args=())
def tucker_select(
    a: Tensor, b: Tensor, s_row: Tensor, s_col: Tensor, core: Tensor, m: int, k: int, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """``tucker.tucker_select``: filter scores a, b (T, H, n), side scores (T, H, r, n), summed cores (H, r, r) ->
    rows and columns (T, H, k) int64. ``impl``: "reference", or "auto" (the numba kernel where
    ``cpu_kernel_usable``, else the reference)."""
    if impl == "auto" and cpu_kernel_usable(a) and (kernel := _cpu_kernel()) is not None:
        return kernel.tucker_select_cpu(a, b, s_row, s_col, core, m, k)
    return tucker.tucker_select(a, b, s_row, s_col, core, m, k)


@tucker_select.register_fake
def _(a, b, s_row, s_col, core, m, k, impl="auto"):
    return a.new_empty(*a.shape[:2], k, dtype=torch.int64), a.new_empty(*a.shape[:2], k, dtype=torch.int64)
