"""Triton backward of the weighted embedding bag.

* weight gradient ``dw[t, l] = <grad_out[t], values[indices[t, l]]>``: a gathered dot, computed by
  ``memlayers.ops.gather_dot``'s kernel (``gather_dot_triton``);
* value gradient ``dV[r] = sum_{(t, l): indices[t, l] = r} weights[t, l] * grad_out[t]``, two ways:
  - ``"atomics"``: grid ``(T, cdiv(d, BLOCK_D))``, each program adds ``w * grad_out[t]`` into its
    rows of an fp32 buffer with ``atomic_add``. Fast, not deterministic;
  - ``"sorted"``: entries sorted by row (stable ``torch.argsort``; one host sync unless a row has
    more than CHUNK**2 entries), then a segment sum where each program owns whole rows (handed out
    longest first, so that the rows a program walks side by side have similar lengths) and adds
    their entries in sorted order: bitwise deterministic. A row with more than ``CHUNK`` entries is
    split into chunks whose fp32 partial sums are reduced again the same way, so one hot row never
    serialises a single program on all T*L entries. When both gradients are wanted
    (``bag_backward_triton``), this pass also computes the weight gradient: each program dots its
    rows of ``values`` (re-read from cache) with the ``grad_out`` rows it gathers anyway, instead
    of a second pass reading all T*L value rows.

Both produce the touched rows only (``rows (U,)``, ``row_grads (U, d)``) or a dense ``(N, d)`` gradient;
the row-sparse path does no O(N) work.
"""

import torch
import triton
import triton.language as tl

from ..gather_dot.triton_kernel import gather_dot_triton
from .triton_forward import accumulation_dtype, tl_dtype

CHUNK = 128  # most entries summed for one row in one pass; longer rows are split into chunks
SEGS = 16  # segments (rows or chunks) one program of the segment sum walks side by side


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
    values_ptr,  # (N, d), row stride `stride_v` (WEIGHT_GRAD only)
    vrows_ptr,  # (K,) value row of each segment (WEIGHT_GRAD only)
    dw_ptr,  # (cdiv(d, BLOCK_D), E) ACC: per column block, the weight-gradient part of each entry
    K,
    E,
    L,
    D,
    stride_o,
    stride_v,
    GATHER: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    SEGS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[dest[k]] = sum_{s in [starts[k], ends[k])} w_s * src[row_s], summed in order of s.

    A program owns SEGS segments and walks them side by side (one entry of each per step), so their
    loads are in flight together. GATHER: row_s = order[s] // L, w_s = weights[order[s]];
    else row_s = s, w_s = 1. WEIGHT_GRAD (with GATHER): the same pass also writes each entry's
    weight gradient <src[row_s], values[vrows[k]]> over this column block to dw[block, order[s]],
    so the value rows are read once per touched row, not once per entry.
    """
    ks = tl.program_id(0).to(tl.int64) * SEGS + tl.arange(0, SEGS)
    mask_k = ks < K
    block = tl.program_id(1).to(tl.int64)  # int64: dw is (n_blocks, E), and n_blocks * E may pass 2**31
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(starts_ptr + ks, mask=mask_k, other=0)
    count = tl.load(ends_ptr + ks, mask=mask_k, other=0) - start
    if WEIGHT_GRAD:
        v_ptrs = values_ptr + tl.load(vrows_ptr + ks, mask=mask_k, other=0).to(tl.int64)[:, None] * stride_v
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
        if WEIGHT_GRAD:  # the value rows are re-read from cache each step: holding them would cost registers
            v = tl.load(v_ptrs + offs_d[None, :], mask=mask_e[:, None] & mask_d[None, :], other=0).to(ACC)
            tl.store(dw_ptr + block * E + entry, tl.sum(g * v, axis=1).to(dw_ptr.dtype.element_ty), mask=mask_e)
    dest = tl.load(dest_ptr + ks, mask=mask_k, other=0)
    tl.store(out_ptr + dest[:, None] * stride_o + offs_d[None, :], acc, mask=mask_k[:, None] & mask_d[None, :])


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), 256)


def weight_grad_triton(
    values: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """values (N, d), indices (T, L), grad_out (T, d) -> dw (T, L) float32 (float64 if an input is).

    ``out``, if given, is a contiguous (T, L) tensor (any float dtype) that is overwritten.
    """
    return gather_dot_triton(values, indices, grad_out, out=out)


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


def _segment_sum(src, starts, ends, dest, out, order=None, weights=None, L=1, wgrad=None, n_heavy=None) -> None:
    """out[dest[k]] = sum of the (weighted) src rows of sorted positions [starts[k], ends[k]).

    src (S, d); starts, ends, dest (K,) int64; out (R, d). With ``order`` (E,) and flat ``weights``
    the rows are ``src[order[s] // L]`` weighted by ``weights[order[s]]``; without, ``src[s]`` unweighted.
    ``wgrad = (values (N, d), vrows (K,), dw (n_blocks, E))`` also writes the entries' weight-gradient
    parts (see the kernel).

    Segments come longest first, so the ``n_heavy`` with more than CHUNK entries are a prefix; each
    is split into chunks of CHUNK whose fp32 partial sums are then summed the same way (one level
    down, the segments with more than CHUNK chunks are again a prefix: ``n_huge``, rows of more than
    CHUNK**2 entries). ``n_heavy`` and ``n_huge`` come from the caller's one host sync; None: count
    them here (a sync; only below the levels the caller counted).
    """
    d = src.shape[1]
    acc = accumulation_dtype(src.dtype)
    if n_heavy is None:
        n_heavy = int(((ends - starts) > CHUNK).sum())
    n_heavy, n_huge = (n_heavy, None) if isinstance(n_heavy, int) else n_heavy
    if n_heavy:
        light_wgrad = wgrad and (wgrad[0], wgrad[1][n_heavy:], wgrad[2])
        _segment_sum(src, starts[n_heavy:], ends[n_heavy:], dest[n_heavy:], out, order, weights, L, light_wgrad, 0)
        h_start, h_end = starts[:n_heavy], ends[:n_heavy]
        n_chunks = triton.cdiv(h_end - h_start, CHUNK)
        last = torch.cumsum(n_chunks, 0)  # one past the last chunk of each heavy segment
        first = last - n_chunks
        # Every chunk gets a row of `partial`, without a sync: the heavy segments hold at most the
        # entries the light ones (>= 1 each) leave, so there are at most that / CHUNK + n_heavy
        # chunks; the spare rows get empty segments (sums of nothing, never read).
        entries = len(order) if order is not None else len(src)
        n_rows = (entries - (len(starts) - n_heavy)) // CHUNK + n_heavy
        chunk = torch.arange(n_rows, device=src.device)
        seg = torch.searchsorted(last, chunk, right=True).clamp_max(n_heavy - 1)  # heavy segment of each chunk
        c_start = h_start[seg] + (chunk - first[seg]) * CHUNK
        c_end = torch.where(chunk < last[-1], torch.minimum(c_start + CHUNK, h_end[seg]), c_start)
        partial = torch.empty(n_rows, d, dtype=acc, device=src.device)
        chunk_wgrad = wgrad and (wgrad[0], wgrad[1][:n_heavy][seg], wgrad[2])
        _segment_sum(src, c_start, c_end, chunk, partial, order, weights, L, chunk_wgrad, 0)
        _segment_sum(partial, first, last, dest[:n_heavy], out, n_heavy=n_huge)
        return
    K = len(starts)
    if K == 0:
        return
    block_d = _block_d(d)
    gather = order is not None
    values, vrows, dw = wgrad or (src, starts, src)  # unused placeholders without WEIGHT_GRAD
    _segment_sum_kernel[(triton.cdiv(K, SEGS), triton.cdiv(d, block_d))](
        src,
        order if gather else starts,
        weights if gather else src,
        starts,
        ends,
        dest,
        out,
        values,
        vrows,
        dw,
        K,
        dw.shape[-1] if wgrad else 0,
        L,
        d,
        out.stride(0),
        values.stride(0),
        GATHER=gather,
        WEIGHT_GRAD=wgrad is not None,
        ACC=tl_dtype(acc),
        SEGS=SEGS,
        BLOCK_D=block_d,
        num_warps=max(1, block_d // 64),
    )


def _sort_by_row(flat: torch.Tensor, num_rows: int):
    """Entries grouped by row, with one host sync.

    flat (E,) row ids -> order (E,) entry ids sorted by row (stable), rows (U,) sorted unique int64,
    starts/ends (U,) their sorted-position ranges, and (rows with more than CHUNK entries, rows with
    more than CHUNK**2) as ints.
    """
    keys = flat.int() if num_rows < 2**31 else flat  # 32-bit keys halve the radix sort's passes
    E = keys.numel()
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    is_start = torch.ones(E, dtype=torch.bool, device=keys.device)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]

    def rows_longer_than(c: int) -> torch.Tensor:  # a row starting at s has more than c entries iff row(s + c) = row(s)
        return (is_start[:-c] & (sorted_keys[c:] == sorted_keys[:-c])).sum() if E > c else is_start.new_zeros(())

    counts = torch.stack([is_start.sum(), rows_longer_than(CHUNK), rows_longer_than(CHUNK * CHUNK)])
    U, n_heavy, n_huge = counts.tolist()  # the one sync: sizes the outputs and the chunking
    starts = torch.nonzero_static(is_start, size=U).squeeze(1)
    ends = torch.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1:] = E
    return order, sorted_keys[starts].long(), starts, ends, (n_heavy, n_huge)


def bag_backward_triton(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    algorithm: str = "sorted",
    sparse: bool = False,
    need_values: bool = True,
    need_weights: bool = True,
):
    """Both gradients of the bag: ``(value grad or None, weight grad (T, L) in weights.dtype or None)``.

    values (N, d), indices (T, L), weights (T, L), grad_out (T, d). The value gradient is as in
    ``value_grad_triton``. With ``"sorted"`` and both gradients wanted, one pass over the touched rows
    computes both (each touched value row read once, the weight gradient summed over column blocks
    in a fixed order: deterministic); otherwise ``weight_grad_triton`` reads the T x L rows again.
    """
    grad_out = grad_out.to(values.dtype)
    if not (need_values and need_weights and algorithm == "sorted"):
        dw = dv = None
        if need_weights:
            dw = torch.empty(weights.shape, dtype=weights.dtype, device=weights.device)
            weight_grad_triton(values, indices, grad_out, out=dw)
        if need_values:
            dv = value_grad_triton(indices, weights, grad_out, values.shape[0], algorithm, sparse)
        return dv, dw
    return _value_grad_sorted(indices, weights, grad_out, values.shape[0], sparse, values)


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
    if algorithm == "sorted":
        return _value_grad_sorted(indices, weights, grad_out, num_rows, sparse)[0]
    T, L = indices.shape
    d = grad_out.shape[1]
    if indices.numel() == 0 or d == 0:
        return _empty_value_grad(grad_out, num_rows, sparse)
    grad_out = grad_out.contiguous()
    if not sparse:
        return _scatter_atomic(indices, weights, grad_out, num_rows).to(grad_out.dtype)
    keys = indices.reshape(-1)
    keys = keys.int() if num_rows < 2**31 else keys
    rows, inverse = torch.unique(keys, return_inverse=True)
    return rows.long(), _scatter_atomic(inverse.view(T, L), weights, grad_out, len(rows)).to(grad_out.dtype)


def _empty_value_grad(grad_out, num_rows: int, sparse: bool):
    d = grad_out.shape[1]
    if sparse:
        return grad_out.new_zeros(0, dtype=torch.int64), grad_out.new_zeros(0, d)
    return grad_out.new_zeros(num_rows, d)


def _value_grad_sorted(indices, weights, grad_out, num_rows: int, sparse: bool, values=None):
    """The deterministic sorted value gradient (as ``value_grad_triton``) and, given ``values``, the
    weight gradient (T, L) in weights.dtype from the same pass (else None)."""
    T, L = indices.shape
    d = grad_out.shape[1]
    device, dtype = grad_out.device, grad_out.dtype
    if indices.numel() == 0 or d == 0:
        dw = None if values is None else torch.zeros_like(weights)
        return _empty_value_grad(grad_out, num_rows, sparse), dw
    grad_out = grad_out.contiguous()
    order, rows, starts, ends, heavy = _sort_by_row(indices.reshape(-1), num_rows)  # heavy: (n_heavy, n_huge)
    if sparse:
        out = torch.empty(len(rows), d, dtype=dtype, device=device)
        dest = torch.arange(len(rows), device=device)
    else:
        out = torch.zeros(num_rows, d, dtype=dtype, device=device)
        dest = rows
    # A program walks its SEGS segments side by side for as many steps as the longest one has
    # entries; handing out segments longest first groups equal lengths, so few steps are masked.
    # Each segment's sum is the same whichever program computes it: still deterministic.
    by_length = torch.sort(ends - starts, descending=True, stable=True).indices
    starts, ends, dest, seg_rows = starts[by_length], ends[by_length], dest[by_length], rows[by_length]
    wgrad = None
    if values is not None:
        values = values if values.stride(1) == 1 else values.contiguous()
        parts = torch.empty(triton.cdiv(d, _block_d(d)), T * L, dtype=accumulation_dtype(dtype), device=device)
        wgrad = (values, seg_rows, parts)
    _segment_sum(grad_out, starts, ends, dest, out, order, weights.contiguous().reshape(-1), L, wgrad, heavy)
    grad = (rows, out) if sparse else out
    if values is None:
        return grad, None
    dw = parts[0] if len(parts) == 1 else parts.sum(0)  # column blocks in a fixed order: deterministic
    return grad, dw.view(T, L).to(weights.dtype)
