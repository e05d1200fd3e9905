"""Triton forward of the weighted embedding bag: ``out[t] = sum_l weights[t, l] * values[indices[t, l]]``.

Grid ``(T, cdiv(d, BLOCK_D))``: a program owns one token and one column block. It walks the bag in
tiles of ``BLOCK_L`` rows, loading a ``(BLOCK_L, BLOCK_D)`` tile at a time so several rows are in
flight per program, and keeps a 2-D fp32 accumulator that is reduced over the bag once at the end
(no cross-warp reduction inside the loop). Any ``d`` works: the column tail is masked.
"""

import torch
import triton
import triton.language as tl


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16/32-bit tables, float64 stays float64 (as in the reference)."""
    return torch.promote_types(dtype, torch.float32)


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


@triton.jit
def _bag_forward_kernel(
    values_ptr,  # (N, d), row stride `stride_v`
    indices_ptr,  # (T, L) contiguous, int32 or int64
    weights_ptr,  # (T, L) contiguous
    out_ptr,  # (T, d), row stride `stride_o`
    L,
    D,
    stride_v,
    stride_o,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_l = tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        mask_l = l0 + offs_l < L
        idx = tl.load(indices_ptr + t * L + l0 + offs_l, mask=mask_l, other=0).to(tl.int64)
        w = tl.load(weights_ptr + t * L + l0 + offs_l, mask=mask_l, other=0).to(ACC)
        rows = tl.load(
            values_ptr + idx[:, None] * stride_v + offs_d[None, :],
            mask=mask_l[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += w[:, None] * rows
    tl.store(out_ptr + t * stride_o + offs_d, tl.sum(acc, axis=0), mask=mask_d)


def forward_config(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps for a table of width ``d``: about 2 KiB of row per tile row.

    ``benchmarks/kernels.py --sweep`` times the alternatives on a real card.
    """
    block_d = min(triton.next_power_of_2(d), 2048 // dtype.itemsize)
    return {"BLOCK_L": 2, "BLOCK_D": block_d, "num_warps": 2}  # best of the sweep on an H200 at d=1024 bf16


def bag_forward_triton(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """values (N, d), indices (T, L) int32/int64, weights (T, L) -> out (T, d) in values.dtype.

    ``out``, if given, is a (T, d) tensor of values.dtype with unit column stride that is overwritten.
    """
    T, L = indices.shape
    d = values.shape[1]
    if out is None:
        out = torch.empty(T, d, dtype=values.dtype, device=values.device)
    if T == 0 or d == 0:
        return out
    if L == 0:
        return out.zero_()
    values = values if values.stride(1) == 1 else values.contiguous()
    cfg = dict(config or forward_config(d, values.dtype))
    grid = (T, triton.cdiv(d, cfg["BLOCK_D"]))
    _bag_forward_kernel[grid](
        values,
        indices.contiguous(),
        weights.contiguous(),
        out,
        L,
        d,
        values.stride(0),
        out.stride(0),
        ACC=tl_dtype(accumulation_dtype(values.dtype)),
        **cfg,
    )
    return out
