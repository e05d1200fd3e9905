"""Triton kernel of the gathered dot products: ``out[t, l] = table[ids[t, l]] · x[t]``.

The one kernel for this function: ``gather_dot``'s forward and the embedding bag's weight gradient
(``dw[t, l] = values[indices[t, l]] · grad_out[t]``, ``embedding_bag.triton_backward.weight_grad_triton``).

Grid ``(T, cdiv(L, BLOCK_L))``: a program owns one token and ``BLOCK_L`` of its ids. It walks d in
column blocks; each block of ``x[t]`` is loaded once and dotted with a ``(BLOCK_L, BLOCK_D)`` tile of
gathered rows, into a 2-D accumulator (float32; float64 if an input is float64) reduced over d once at
the end. Inputs are cast to the accumulation dtype right after loading (the CPU interpreter has no bf16
arithmetic), so table and x may differ in dtype. Any d and L work: both tails are masked.
"""

import torch
import triton
import triton.language as tl

from ..embedding_bag.triton_forward import tl_dtype
from .reference import accumulation_dtype


@triton.jit
def _gather_dot_kernel(
    table_ptr,  # (N, d), row stride `stride_t`, unit column stride
    ids_ptr,  # (T, L) contiguous, int32 or int64
    x_ptr,  # (T, d), row stride `stride_x` (0 for an expanded x), unit column stride
    out_ptr,  # (T, L) contiguous, any float dtype
    L,
    D,
    stride_t,
    stride_x,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    idx = tl.load(ids_ptr + t * L + offs_l, mask=mask_l, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xs = tl.load(x_ptr + t * stride_x + offs_d, mask=mask_d, other=0).to(ACC)
        rows = tl.load(
            table_ptr + idx[:, None] * stride_t + offs_d[None, :],
            mask=mask_l[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += rows * xs[None, :]
    tl.store(out_ptr + t * L + offs_l, tl.sum(acc, axis=1), mask=mask_l)


MAX_BLOCK_L, MAX_BLOCK_D = 16, 256


def tile_config(L: int, d: int) -> dict:
    """Tile sizes: up to 16 ids by up to 256 columns per step (untuned; 4 warps whatever the tile)."""
    return {
        "BLOCK_L": min(triton.next_power_of_2(L), MAX_BLOCK_L),
        "BLOCK_D": min(triton.next_power_of_2(d), MAX_BLOCK_D),
        "num_warps": 4,
    }


def gather_dot_triton(
    table: torch.Tensor,
    ids: torch.Tensor,
    x: torch.Tensor,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """table (N, d), ids (T, L) int32/int64, x (T, d) -> (T, L) float32 (float64 if an input is).

    ``config``: tile sizes and warps (default ``tile_config(L, d)``). ``out``, if given, is a contiguous
    (T, L) tensor of any float dtype that is overwritten and returned (the sums are cast on store).
    Not differentiable by itself (``memlayers.ops.gather_dot`` wraps it); inputs are not validated here.
    """
    T, L = ids.shape
    d = table.shape[1]
    acc = accumulation_dtype(table.dtype, x.dtype)
    if out is None:
        out = torch.empty(T, L, dtype=acc, device=table.device)
    if out.numel() == 0:
        return out
    if d == 0:
        return out.zero_()
    table = table if table.stride(1) == 1 else table.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = dict(config or tile_config(L, d))
    _gather_dot_kernel[(T, triton.cdiv(L, cfg["BLOCK_L"]))](
        table, ids.contiguous(), x, out, L, d, table.stride(0), x.stride(0), ACC=tl_dtype(acc), **cfg
    )
    return out
