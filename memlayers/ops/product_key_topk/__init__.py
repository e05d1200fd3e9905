"""Exact product-key top-k: ``(q1, q2, K1, K2, k) -> (scores, indices)`` per head.

CUDA tensors go to the fused Triton selection (``triton_select.py``) when Triton is installed, float32 CPU
tensors to the reference with its selection compiled by numba (``cpu_select.py``) when numba is installed,
everything else to the plain-PyTorch reference; all return the same indices and scores.
"""

import functools

import torch

from ..dispatch import use_triton
from . import library
from .reference import product_key_topk as product_key_topk_reference

__all__ = ["product_key_topk", "product_key_topk_reference", "triton_unsupported"]

N_MAX = 4096  # sub-keys per half the Triton selection takes (4 warps of 32 threads hold 32 scores each)
K_MAX = 128  # top-k it takes
TRITON_DTYPES = (torch.float32, torch.bfloat16)  # score dtypes it takes


def triton_unsupported(n: int, k: int, dtype: torch.dtype) -> str | None:
    """Why the Triton selection cannot take ``n`` sub-keys per half, top ``k`` and scores of ``dtype``, or None.

    Its supported range: 1 <= k <= n <= N_MAX (4096), k <= K_MAX (128), float32 or bfloat16 scores.
    Everything else goes to the reference (``impl="auto"``) or is refused with this reason (``"triton"``).
    """
    if dtype not in TRITON_DTYPES:
        return f"the selection kernel takes float32 or bfloat16 scores, not {dtype}"
    if not 1 <= k <= n:
        return f"k={k} must be in [1, n={n}]"
    if n > N_MAX:
        return f"the selection kernel takes n <= {N_MAX} sub-keys per half, got n={n}"
    if k > K_MAX:
        return f"the selection kernel takes k <= {K_MAX}, got k={k}"
    return None


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int, *, impl: str = "auto"
):
    """Exact top-k over the n*n product keys of each head.

    q1, q2 (T, H, h); keys1, keys2 (H, n, h) -> scores (T, H, k) best first, indices (T, H, k) int64.
    See ``reference.py`` for the tie rule (lower flat index wins). ``impl``: "auto" (Triton
    selection for CUDA tensors when available and ``triton_unsupported`` has no objection, else the
    reference, its selection by numba for float32 CPU scores when numba is installed and
    ``MEMLAYERS_CPU_KERNELS`` is not "0"), "reference" (plain torch only), or "triton" (on CPU only under
    ``TRITON_INTERPRET=1``).
    """
    if q1.dim() != 3 or q1.shape != q2.shape:
        raise ValueError(
            f"product_key_topk: q1 and q2 must both be (tokens, heads, half_dim), got {tuple(q1.shape)} and {tuple(q2.shape)}"
        )
    if keys1.dim() != 3 or keys1.shape != keys2.shape:
        raise ValueError(
            f"product_key_topk: keys1 and keys2 must both be (heads, n, half_dim), got {tuple(keys1.shape)} and {tuple(keys2.shape)}"
        )
    H, n, h = keys1.shape
    if q1.shape[1:] != (H, h):
        raise ValueError(
            f"product_key_topk: queries (…, {q1.shape[1]}, {q1.shape[2]}) do not match keys with {H} heads of half_dim {h}"
        )
    if not 1 <= k <= n:
        raise ValueError(f"product_key_topk: k={k} must be in [1, n={n}] (n sub-keys per half)")
    if n * n > 2**32 - 1:
        raise ValueError(f"product_key_topk: n={n} sub-keys per half is too many: flat ids i*n + j must fit in 32 bits")
    if not (q1.device == q2.device == keys1.device == keys2.device):
        raise ValueError("product_key_topk: queries and keys must be on one device")
    if use_triton("product_key_topk", impl, q1, triton_unsupported(n, k, q1.dtype)):
        from .triton_select import product_key_topk_triton  # imported lazily: CPU installs need no Triton

        return product_key_topk_triton(q1, q2, keys1, keys2, k)
    select = functools.partial(library.select, impl=impl)  # "auto" or "reference": "triton" returned above
    return product_key_topk_reference(q1, q2, keys1, keys2, k, select=select)
