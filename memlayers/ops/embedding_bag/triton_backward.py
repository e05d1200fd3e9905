"""Triton backward of the weighted embedding bag.

* weight gradient ``dw[t, l] = <grad_out[t], values[indices[t, l]]>``: grid ``(T, cdiv(L, BLOCK_L))``,
  each program walks d in column blocks with a 2-D fp32 accumulator, reduced once at the end;
* value gradient ``dV[r] = sum_{(t, l): indices[t, l] = r} weights[t, l] * grad_out[t]``, two ways:
  - ``"atomics"``: grid ``(T, cdiv(d, BLOCK_D))``, each program adds ``w * grad_out[t]`` into its
    rows of an fp32 buffer with ``atomic_add``. Fast, not deterministic;
  - ``"sorted"``: entries sorted by row (stable ``torch.argsort``), then a segment sum where each
    program owns whole rows and adds their entries in sorted order: bitwise deterministic.
    A row with more than ``CHUNK`` entries is split into chunks whose fp32 partial sums are
    reduced again the same way, so one hot row never serialises a single program on all T*L entries.

Both produce the touched rows only (``rows (U,)``, ``row_grads (U, d)``) or a dense ``(N, d)`` gradient;
the row-sparse path does no O(N) work.
"""

import torch
import triton
import triton.language as tl

from .triton_forward import accumulation_dtype, tl_dtype

CHUNK = 128  # most entries summed for one row in one pass; longer rows are split into chunks
SEGS = 16  # segments (rows or chunks) one program of the segment sum walks side by side


@triton.jit
def _weight_grad_kernel(
    values_ptr,  # (N, d), row stride `stride_v`
    indices_ptr,  # (T, L) contiguous
    grad_ptr,  # (T, d) contiguous
    out_ptr,  # (T, L) contiguous
    L,
    D,
    stride_v,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    idx = tl.load(indices_ptr + t * L + offs_l, mask=mask_l, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(grad_ptr + t * D + offs_d, mask=mask_d, other=0).to(ACC)
        rows = tl.load(
            values_ptr + idx[:, None] * stride_v + offs_d[None, :],
            mask=mask_l[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += rows * g[None, :]
    tl.store(out_ptr + t * L + offs_l, tl.sum(acc, axis=1), mask=mask_l)


@triton.jit
def _scatter_atomic_kernel(
    dest_ptr,  # (T, L) contiguous: row of `out` each entry adds into
    weights_ptr,  # (T, L) contiguous
    grad_ptr,  # (T, d) contiguous
    out_ptr,  # (R, d) contiguous, ACC dtype, pre-zeroed
    L,
    D,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    g = tl.load(grad_ptr + t * D + offs_d, mask=mask_d, other=0).to(ACC)
    offs_l = tl.arange(0, BLOCK_L)
    for l0 in range(0, L, BLOCK_L):
        mask_l = l0 + offs_l < L
        dest = tl.load(dest_ptr + t * L + l0 + offs_l, mask=mask_l, other=0).to(tl.int64)
        w = tl.load(weights_ptr + t * L + l0 + offs_l, mask=mask_l, other=0).to(ACC)
        tl.atomic_add(
            out_ptr + dest[:, None] * D + offs_d[None, :],
            w[:, None] * g[None, :],
            mask=mask_l[:, None] & mask_d[None, :],
            sem="relaxed",
        )


@triton.jit
def _segment_sum_kernel(
    src_ptr,  # (S, d) contiguous: grad_out (GATHER) or fp32 partial sums
    order_ptr,  # (E,) entry ids sorted by row (GATHER only)
    weights_ptr,  # (T*L,) weights by entry id (GATHER only)
    starts_ptr,  # (K,) first sorted position of each segment
    ends_ptr,  # (K,) one past its last
    dest_ptr,  # (K,) row of `out` the segment's sum goes to
    out_ptr,  # (R, d), row stride `stride_o`
    K,
    L,
    D,
    stride_o,
    GATHER: tl.constexpr,
    ACC: tl.constexpr,
    SEGS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[dest[k]] = sum_{s in [starts[k], ends[k])} w_s * src[row_s], summed in order of s.

    A program owns SEGS segments and walks them side by side (one entry of each per step), so their
    loads are in flight together. GATHER: row_s = order[s] // L, w_s = weights[order[s]];
    else row_s = s, w_s = 1.
    """
    ks = tl.program_id(0).to(tl.int64) * SEGS + tl.arange(0, SEGS)
    mask_k = ks < K
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(starts_ptr + ks, mask=mask_k, other=0)
    count = tl.load(ends_ptr + ks, mask=mask_k, other=0) - start
    acc = tl.zeros((SEGS, BLOCK_D), dtype=ACC)
    for j in range(tl.max(count, axis=0)):
        mask_e = j < count
        if GATHER:
            entry = tl.load(order_ptr + start + j, mask=mask_e, other=0)
            src_row = entry // L
            w = tl.load(weights_ptr + entry, mask=mask_e, other=0).to(ACC)
        else:
            src_row = start + j
            w = tl.full((SEGS,), 1, dtype=ACC)
        g = tl.load(
            src_ptr + src_row[:, None] * D + offs_d[None, :],
            mask=mask_e[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += w[:, None] * g
    dest = tl.load(dest_ptr + ks, mask=mask_k, other=0)
    tl.store(out_ptr + dest[:, None] * stride_o + offs_d[None, :], acc, mask=mask_k[:, None] & mask_d[None, :])


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), 256)


def weight_grad_triton(
    values: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """values (N, d), indices (T, L), grad_out (T, d) -> dw (T, L) in the accumulation dtype.

    ``out``, if given, is a contiguous (T, L) tensor (any float dtype) that is overwritten.
    """
    T, L = indices.shape
    d = values.shape[1]
    acc = accumulation_dtype(values.dtype)
    if out is None:
        out = torch.empty(T, L, dtype=acc, device=values.device)
    if out.numel() == 0:
        return out
    if d == 0:
        return out.zero_()
    values = values if values.stride(1) == 1 else values.contiguous()
    block_l = min(triton.next_power_of_2(L), 16)
    block_d = _block_d(d)
    _weight_grad_kernel[(T, triton.cdiv(L, block_l))](
        values,
        indices.contiguous(),
        grad_out.contiguous(),
        out,
        L,
        d,
        values.stride(0),
        ACC=tl_dtype(acc),
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def _scatter_atomic(dest: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, num_rows: int) -> torch.Tensor:
    """dest (T, L) rows in [0, num_rows), weights (T, L), grad_out (T, d) -> (num_rows, d) accumulation dtype."""
    T, L = dest.shape
    d = grad_out.shape[1]
    acc = accumulation_dtype(grad_out.dtype)
    out = torch.zeros(num_rows, d, dtype=acc, device=grad_out.device)
    block_d = _block_d(d)
    _scatter_atomic_kernel[(T, triton.cdiv(d, block_d))](
        dest.contiguous(),
        weights.contiguous(),
        grad_out.contiguous(),
        out,
        L,
        d,
        ACC=tl_dtype(acc),
        BLOCK_L=min(triton.next_power_of_2(L), 8),
        BLOCK_D=block_d,
        num_warps=max(1, block_d // 128),
    )
    return out


def _segment_sum(src, starts, ends, dest, out, order=None, weights=None, L=1) -> None:
    """out[dest[k]] = sum of the (weighted) src rows of sorted positions [starts[k], ends[k]).

    src (S, d); starts, ends, dest (K,) int64; out (R, d). With ``order`` (E,) and flat ``weights``
    the rows are ``src[order[s] // L]`` weighted by ``weights[order[s]]``; without, ``src[s]`` unweighted.
    """
    d = src.shape[1]
    acc = accumulation_dtype(src.dtype)
    heavy = (ends - starts) > CHUNK
    if bool(heavy.any()):
        light = ~heavy
        _segment_sum(src, starts[light], ends[light], dest[light], out, order, weights, L)
        h_start, h_end = starts[heavy], ends[heavy]
        n_chunks = triton.cdiv(h_end - h_start, CHUNK)
        first = torch.cumsum(n_chunks, 0) - n_chunks  # first chunk of each heavy segment
        seg = torch.repeat_interleave(torch.arange(len(n_chunks), device=src.device), n_chunks)
        c_start = h_start[seg] + (torch.arange(len(seg), device=src.device) - first[seg]) * CHUNK
        c_end = torch.minimum(c_start + CHUNK, h_end[seg])
        partial = torch.empty(len(seg), d, dtype=acc, device=src.device)
        _segment_sum(src, c_start, c_end, torch.arange(len(seg), device=src.device), partial, order, weights, L)
        _segment_sum(partial, first, first + n_chunks, dest[heavy], out)
        return
    K = len(starts)
    if K == 0:
        return
    block_d = _block_d(d)
    gather = order is not None
    _segment_sum_kernel[(triton.cdiv(K, SEGS), triton.cdiv(d, block_d))](
        src,
        order if gather else starts,
        weights if gather else src,
        starts,
        ends,
        dest,
        out,
        K,
        L,
        d,
        out.stride(0),
        GATHER=gather,
        ACC=tl_dtype(acc),
        SEGS=SEGS,
        BLOCK_D=block_d,
        num_warps=max(1, block_d // 64),
    )


def value_grad_triton(
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    num_rows: int,
    algorithm: str = "sorted",
    sparse: bool = False,
):
    """Value-table gradient of the bag, in grad_out.dtype.

    indices (T, L) in [0, num_rows), weights (T, L), grad_out (T, d) ->
    ``(rows (U,) sorted unique int64, row_grads (U, d))`` if ``sparse`` else dense ``(num_rows, d)``.
    """
    if algorithm not in ("sorted", "atomics"):
        raise ValueError(f"value_grad_triton: algorithm must be 'sorted' or 'atomics', got {algorithm!r}")
    T, L = indices.shape
    d = grad_out.shape[1]
    device, dtype = grad_out.device, grad_out.dtype
    flat = indices.reshape(-1)
    if flat.numel() == 0 or d == 0:
        if sparse:
            return flat.new_zeros(0, dtype=torch.int64), grad_out.new_zeros(0, d)
        return grad_out.new_zeros(num_rows, d)
    grad_out = grad_out.contiguous()
    if algorithm == "atomics" and not sparse:
        return _scatter_atomic(indices, weights, grad_out, num_rows).to(dtype)
    keys = flat.int() if num_rows < 2**31 else flat  # 32-bit keys halve the radix sort's passes
    if algorithm == "atomics":
        rows, inverse = torch.unique(keys, return_inverse=True)
        return rows.long(), _scatter_atomic(inverse.view(T, L), weights, grad_out, len(rows)).to(dtype)
    order = torch.argsort(keys, stable=True)
    rows, counts = torch.unique_consecutive(keys[order], return_counts=True)
    rows = rows.long()
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    if sparse:
        out = torch.empty(len(rows), d, dtype=dtype, device=device)
        dest = torch.arange(len(rows), device=device)
    else:
        out = torch.zeros(num_rows, d, dtype=dtype, device=device)
        dest = rows
    _segment_sum(grad_out, starts, ends, dest, out, order, weights.contiguous().reshape(-1), L)
    return (rows, out) if sparse else out
