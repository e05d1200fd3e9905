"""The exact selection as a ``torch.library`` custom op, ``memlayers::product_key_select``: sub-key scores in,
flat ids of the top k product keys out. ``torch.compile`` sees one node with a known output shape (the
reference's data-dependent steps and the Triton kernel stay inside), so a memory layer traces whole."""

import torch
from torch import Tensor

from .reference import product_key_select


@torch.library.custom_op("memlayers::product_key_select", mutates_args=())
def select(s1: Tensor, s2: Tensor, k: int, use_kernel: bool = False) -> Tensor:
    """s1, s2 (T, H, n) sub-key scores -> (T, H, k) int64 flat ids ``i*n + j``, best first, ties to the lower
    id; ``use_kernel``: by the Triton selection (its default configuration), else by the reference."""
    if use_kernel:
        from .triton_select import product_key_select_triton

        return product_key_select_triton(s1, s2, k)
    return product_key_select(s1, s2, k)


@select.register_fake
def _(s1, s2, k, use_kernel=False):
    return s1.new_empty(*s1.shape[:2], k, dtype=torch.int64)
