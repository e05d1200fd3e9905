"""The selections on CPU, compiled by numba: ``reference.product_key_select``'s function, id for id, and
``tucker.tucker_select``'s (UltraMem's; ties there go to the lower position, where torch's ``topk`` breaks them
its own way).

Optional: numba comes with ``pip install 'memlayers[cpu]'`` (the ``train`` extra includes it). Without numba,
with ``MEMLAYERS_CPU_KERNELS=0``, or for scores other than float32, the references run. They spend most of their
time in torch's CPU ``topk`` (~10 ns per score on this project's VM); here each row (a token's head) is one pass of
compiled code, and every top k of a row (``_top_k_row``) works so:

* every score's key is the reference's ordering key (order-preserving float bits, ties to the lower position);
* only the scores at or above a threshold that leaves at least k are ranked: ``mean + z std`` of the row, z set for
  ~1.5 k + 8 survivors of normally distributed scores; where that keeps fewer than k (or is not finite), the lowest
  of k group maxima, which always keeps k. Up to 64 survivors are each placed at their rank, the count of larger
  ones (vectorised, without the branches of a sort); more are sorted.

The product-key grid's cells that can win (``reference.grid_candidates``) are ranked by the same keys (ties to
the lower flat id), only those at or above the k-th best of the 2k - 1 distinct cells (0, b) and (a, 0). The Tucker
selection computes each side's filter scores from its side scores (as the reference does), takes a side's top and
bottom m in one pass, and reads the side scores where they lie (``_rows``). Rows are split over torch's threads
(``numba_threads``).
"""

import math
import statistics

import numba
import numpy as np
import torch

from ..numba_threads import threads_for

ROWS_PER_CHUNK = 128
NO_BOUND = np.int64(2**62)
LOW32 = np.int64(0xFFFFFFFF)


def threshold_z(n: int, k: int) -> float:
    """z such that ``mean + z std`` leaves ~1.5 k + 8 of n normally distributed scores; -inf: no threshold."""
    keep = (1.5 * k + 8) / n
    return -math.inf if keep >= 1 else statistics.NormalDist().inv_cdf(1 - keep)


def product_key_select_cpu(s1: torch.Tensor, s2: torch.Tensor, k: int) -> torch.Tensor:
    """s1, s2 (T, H, n) float32 CPU sub-key scores -> (T, H, k) int64 flat ids ``i*n + j`` of the k best sums
    ``s1[i] + s2[j]``, best first, ties to the lower id: ``reference.product_key_select``'s output."""
    T, H, n = s1.shape
    if s2.shape != s1.shape or not 1 <= k <= n:  # the kernel reads unchecked: refuse what the reference refuses
        raise ValueError(f"product_key_select: need s1, s2 of one shape (T, H, n) and 1 <= k <= n, got "
                         f"{tuple(s1.shape)}, {tuple(s2.shape)}, k={k}")  # fmt: skip
    out = torch.empty(T, H, k, dtype=torch.int64)
    if out.numel():
        _run(_select, _select_in_parallel, H * T, _head_major(s1), _head_major(s2), k, threshold_z(n, k), out.numpy())
    return out


def tucker_select_cpu(
    s_row: torch.Tensor, s_col: torch.Tensor, u: torch.Tensor, v: torch.Tensor, core: torch.Tensor, m: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tucker.tucker_select`` for float32 CPU scores: s_row, s_col (T, H, r, n), the filter pair u, v (H, r), core
    (H, r, r) -> the rows and columns (T, H, k) int64 of each head's k best cells, best first, ties to the lower
    position, and their side scores (T, H, r, k) float32."""
    T, H, r, n = s_row.shape
    shapes = (s_col.shape, u.shape, v.shape, core.shape) == (s_row.shape, (H, r), (H, r), (H, r, r))
    if not shapes or not 1 <= k <= m <= n:
        raise ValueError(f"tucker_select: need s_row, s_col (T, H, r, n), u, v (H, r), core (H, r, r) and 1 <= k <= m "
                         f"<= n, got {tuple(s_row.shape)}, {tuple(s_col.shape)}, {tuple(u.shape)}, {tuple(v.shape)}, "
                         f"{tuple(core.shape)}, m={m}, k={k}")  # fmt: skip
    out_i, out_j = (torch.empty(T, H, k, dtype=torch.int64) for _ in range(2))
    out_sr, out_sc = (torch.empty(T, H, r, k) for _ in range(2))
    if out_i.numel():
        u, v, core = (x.detach().float().contiguous().numpy() for x in (u, v, core))
        z_side, z_grid = threshold_z(n, m), threshold_z((2 if m < n else 1) * m * m, k)
        outs = (out_i.numpy(), out_j.numpy(), out_sr.numpy(), out_sc.numpy())
        _run(_tucker, _tucker_in_parallel, H * T, *_rows(s_row), *_rows(s_col), u, v, core, n, m, k, z_side, z_grid,
             *outs)  # fmt: skip
    return out_i, out_j, out_sr, out_sc


def _rows(x: torch.Tensor):
    """x (T, H, r, n) -> (flat, strides): its elements as one flat array, where row (t, h, a) starts at
    ``t * strides[0] + h * strides[1] + a * strides[2]``, and strides (3,) int64; no copy when x's rows are
    contiguous (a copy of a per-rank einsum's (H, r, T, n) output would cost more than a small layer's selection)."""
    x = x.detach() if x.stride(-1) == 1 else x.detach().contiguous()
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    return torch.as_strided(x, (span,), (1,)).numpy(), np.array(x.stride()[:3], np.int64)


def _head_major(x: torch.Tensor):
    """x (T, H, ...) -> a C-contiguous array (H*T, ...), row h*T + t: free for the scores' einsums, whose outputs
    are laid out head-major (a copy otherwise); the kernels are fastest on contiguous rows."""
    return x.detach().transpose(0, 1).contiguous().flatten(0, 1).numpy()


def _run(kernel, parallel_kernel, rows: int, *args) -> None:
    """``kernel(*args, 0, rows)`` over all rows (head-major: row h*T + t) on this thread, or ``parallel_kernel`` over
    chunks of rows on min(torch's threads, rows / ROWS_PER_CHUNK) threads."""
    threads = threads_for(rows, ROWS_PER_CHUNK)
    if threads == 1:
        kernel(*args, 0, rows)
    else:
        parallel_kernel(*args, rows, 4 * threads)


@numba.njit(inline="always")
def _ordered(x):
    """float32 -> int64 in float order (the reference's ``_order_keys`` high half): -0.0 ties +0.0."""
    bits = np.int64(np.float32(x + np.float32(0.0)).view(np.int32))
    return bits ^ ((bits >> 63) & 0x7FFFFFFF)


@numba.njit(inline="always")
def _rank_key(x, negate):
    """``_ordered(x)``, or with negate its reverse, ``~_ordered(x)``: the lowest first, NaN last, -0.0 still tying
    +0.0 (what ``topk(largest=False)`` ranks by)."""
    o = _ordered(x)
    return ~o if negate else o


@numba.njit(inline="always")
def _sort_descending(keys, c):
    """keys[:c] sorted in place, largest first (insertion for up to 64, else a full sort)."""
    if c > 64:
        keys[:c].sort()
        for q in range(c // 2):
            keys[q], keys[c - 1 - q] = keys[c - 1 - q], keys[q]
        return
    for q in range(1, c):
        key, i = keys[q], q
        while i > 0 and keys[i - 1] < key:
            keys[i] = keys[i - 1]
            i -= 1
        keys[i] = key


@numba.njit(inline="always")
def _best(keys, c, k, out):
    """out[:k] = the ties (low 32 bits, inverted) of the k largest of keys[:c] (distinct), c >= k, largest first
    (keys: scratch of at least 2c)."""
    if c > 64:
        _sort_descending(keys, c)
        for q in range(k):
            out[q] = LOW32 - (keys[q] & LOW32)
        return
    for q in range(c):  # each key placed at its rank, the count of larger keys: vectorised counts, no branches
        key, rank = keys[q], np.int32(0)
        for e in range(c):
            rank += np.int32(keys[e] > key)
        keys[c + rank] = key
    for q in range(k):
        out[q] = LOW32 - (keys[c + q] & LOW32)


@numba.njit(fastmath={"reassoc", "contract"})
def _moments(x):
    s = np.float32(0.0)
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        s += x[j]
        ss += x[j] * x[j]
    mean = s / x.shape[0]
    return mean, ss / x.shape[0] - mean * mean


@numba.njit(inline="always")
def _keep_at_or_above(x, negate, tau, keys):
    """keys[:c] = the keys of the scores x[j] whose rank key (``_rank_key``) is at or above tau, in position order;
    -> c."""
    c = 0
    for j in range(x.shape[0]):  # branch-free: every key is written, c advances past the kept ones
        o = _rank_key(x[j], negate)
        keys[c] = (o << 32) | (LOW32 - j)
        c += o >= tau
    return c


@numba.njit(inline="always")
def _spread_threshold(mean, var, z, negate):
    """The rank key of ``mean + z std`` (negate: of ``mean - z std``), or NO_BOUND where that is not finite (NaN or
    inf scores, a negative rounded var)."""
    t = mean - np.float32(z) * np.sqrt(var) if negate else mean + np.float32(z) * np.sqrt(var)
    return _rank_key(np.float32(t), negate) if np.isfinite(t) else NO_BOUND


@numba.njit(inline="always")
def _finish_top_k(x, k, negate, keys, c, out):
    """out[:k] = the best k of keys[:c] (the scores kept); where fewer than k were kept, the scores at or above the
    lowest of k group maxima (which always keeps at least k) instead."""
    n = x.shape[0]
    if c < k:
        bound = NO_BOUND
        for g in range(k):
            top = _rank_key(x[g * n // k], negate)
            for j in range(g * n // k + 1, (g + 1) * n // k):
                top = max(top, _rank_key(x[j], negate))
            bound = min(bound, top)
        c = _keep_at_or_above(x, negate, bound, keys)
    _best(keys, c, k, out)


@numba.njit(inline="always")
def _top_k_row(x, k, z, keys, out):
    """out[:k] = positions of the k best scores of the row x (n,), best first, ties to the lower position
    (keys: scratch of 2n); z: ``threshold_z(n, k)``."""
    c = 0
    if z > -np.inf:
        mean, var = _moments(x)
        c = _keep_at_or_above(x, False, _spread_threshold(mean, var, z, False), keys)
    _finish_top_k(x, k, False, keys, c, out)


@numba.njit(inline="always")
def _top_and_bottom_k_row(x, k, z, keys, keys_low, top, bottom):
    """``_top_k_row`` of x into top[:k], and the k lowest (ascending, ties to the lower position, NaN last) into
    bottom[:k], from one pass over x."""
    c = c_low = 0
    if z > -np.inf:
        mean, var = _moments(x)
        tau, tau_low = _spread_threshold(mean, var, z, False), _spread_threshold(mean, var, z, True)
        for j in range(x.shape[0]):  # both of _keep_at_or_above's loops in one
            o = _ordered(x[j])
            o_low = ~o
            keys[c] = (o << 32) | (LOW32 - j)
            keys_low[c_low] = (o_low << 32) | (LOW32 - j)
            c += o >= tau
            c_low += o_low >= tau_low
    _finish_top_k(x, k, False, keys, c, top)
    _finish_top_k(x, k, True, keys_low, c_low, bottom)


@numba.njit(parallel=True, cache=True)
def _select_in_parallel(s1, s2, k, z, out, rows, chunks):
    for c in numba.prange(chunks):
        _select(s1, s2, k, z, out, rows * c // chunks, rows * (c + 1) // chunks)


@numba.njit(cache=True)
def _select(s1, s2, k, z, out, lo, hi):
    """s1, s2 (H*T, n) (``_head_major``) -> out (T, H, k) at the (token, head) of rows lo..hi-1:
    ``product_key_select_cpu``."""
    n = s1.shape[1]
    tokens = out.shape[0]
    keys = np.empty(2 * max(n, k * k), np.int64)
    i = np.empty(k, np.int64)
    j = np.empty(k, np.int64)
    edge = np.empty(2 * k - 1, np.int64)
    for g in range(lo, hi):
        x1, x2 = s1[g], s2[g]
        _top_k_row(x1, k, z, keys, i)
        _top_k_row(x2, k, z, keys, j)
        # the k-th best sum is at or above the k-th best of the 2k - 1 distinct cells (0, b) and (a, 0)
        for b in range(k):
            edge[b] = _ordered(x1[i[0]] + x2[j[b]])
        for a in range(1, k):
            edge[k - 1 + a] = _ordered(x1[i[a]] + x2[j[0]])
        _sort_descending(edge, 2 * k - 1)
        tau = edge[k - 1]
        c = 0
        for a in range(k):  # the cells (a, b) with (a + 1)(b + 1) <= k: the only ones that can win
            for b in range(k // (a + 1)):
                o = _ordered(x1[i[a]] + x2[j[b]])
                keys[c] = (o << 32) | (LOW32 - (i[a] * n + j[b]))
                c += o >= tau
        _best(keys, c, k, out[g % tokens, g // tokens])


@numba.njit(parallel=True, cache=True)
def _tucker_in_parallel(s_row, row_strides, s_col, col_strides, u, v, core, n, m, k, z_side, z_grid, out_i, out_j,
                        out_sr, out_sc, rows, chunks):  # fmt: skip
    for c in numba.prange(chunks):
        lo, hi = rows * c // chunks, rows * (c + 1) // chunks
        _tucker(s_row, row_strides, s_col, col_strides, u, v, core, n, m, k, z_side, z_grid, out_i, out_j, out_sr,
                out_sc, lo, hi)  # fmt: skip


@numba.njit(inline="always")
def _positive_nans(x):
    """Every NaN of x made +NaN: torch's ``topk`` ranks any NaN as the largest, while the bits of a NaN made by
    arithmetic (inf - inf) carry a sign, which ``_ordered`` would rank below -inf."""
    for i in range(x.shape[0]):
        x[i] = np.float32(np.nan) if x[i] != x[i] else x[i]


@numba.njit(inline="always")
def _candidates(s, strides, w, t, h, m, z, side, keys, keys_low, chosen):
    """chosen[:m] = the top m of one side (s, strides: ``_rows``) of token t, head h by its filter scores
    ``Σ_a w[h, a] S[t, h, a, :]`` (into side (n,), rank by rank: ``tucker.filter_scores``'s floats, each product
    rounded, then summed in rank order); and chosen[m:] the bottom m (ascending, ties to the lower position) when
    chosen has room for them."""
    n, base = side.shape[0], t * strides[0] + h * strides[1]
    row, wa = s[base : base + n], w[h, 0]
    for i in range(n):
        side[i] = row[i] * wa
    for a in range(1, w.shape[1]):
        row, wa = s[base + a * strides[2] : base + a * strides[2] + n], w[h, a]
        for i in range(n):
            side[i] += row[i] * wa
    _positive_nans(side)
    if chosen.shape[0] > m:
        _top_and_bottom_k_row(side, m, z, keys, keys_low, chosen[:m], chosen[m:])
    else:
        _top_k_row(side, m, z, keys, chosen)


@numba.njit(cache=True)
def _tucker(s_row, row_strides, s_col, col_strides, u, v, core, n, m, k, z_side, z_grid, out_i, out_j, out_sr, out_sc,
            lo, hi):  # fmt: skip
    """s_row, s_col: the side scores (T, H, r, n) as ``_rows`` gives them, u, v (H, r), core (H, r, r) -> out_i, out_j
    (T, H, k) and their side scores out_sr, out_sc (T, H, r, k) at the (token, head) of rows lo..hi-1 (row h*T + t):
    each head's top (and bottom) m rows and columns by their filter scores, its m x m grids, their best k cells
    (``tucker.tucker_select``, with its floats: the core applied to the rows first, sums over ranks in rank order)."""
    tokens, r = out_i.shape[0], core.shape[1]
    blocks = 2 if m < n else 1
    cells = blocks * m * m
    keys = np.empty(2 * max(n, cells), np.int64)
    keys_low = np.empty(2 * n, np.int64)
    side = np.empty(n, np.float32)
    i = np.empty(blocks * m, np.int64)
    j = np.empty(blocks * m, np.int64)
    row_core = np.empty((r, m), np.float32)
    columns = np.empty((r, m), np.float32)
    grid = np.empty(cells, np.float32)
    top_i = np.zeros(n, np.bool_)
    top_j = np.zeros(n, np.bool_)
    best = np.empty(k, np.int64)
    for g in range(lo, hi):
        t, h = g % tokens, g // tokens
        _candidates(s_row, row_strides, u, t, h, m, z_side, side, keys, keys_low, i)
        _candidates(s_col, col_strides, v, t, h, m, z_side, side, keys, keys_low, j)
        rows_at = t * row_strides[0] + h * row_strides[1]
        cols_at = t * col_strides[0] + h * col_strides[1]
        for blk in range(blocks):
            for p in range(m):
                for c in range(r):
                    acc = s_row[rows_at + i[blk * m + p]] * core[h, 0, c]
                    for e in range(1, r):
                        acc += s_row[rows_at + e * row_strides[2] + i[blk * m + p]] * core[h, e, c]
                    row_core[c, p] = acc
            for c in range(r):
                for q in range(m):
                    columns[c, q] = s_col[cols_at + c * col_strides[2] + j[blk * m + q]]
            _grid_block(row_core, columns, grid[blk * m * m : (blk + 1) * m * m])
        if blocks == 2:  # a bottom cell whose row and column are both in the top block is there already
            for p in range(m):
                top_i[i[p]] = True
                top_j[j[p]] = True
            for p in range(m):
                if top_i[i[m + p]]:
                    for q in range(m):
                        if top_j[j[m + q]]:
                            grid[(m + p) * m + q] = -np.inf
            for p in range(m):
                top_i[i[p]] = False
                top_j[j[p]] = False
        _positive_nans(grid)
        _top_k_row(grid, k, z_grid, keys, best)
        for q in range(k):
            blk, cell = best[q] // (m * m), best[q] % (m * m)
            row, col = i[blk * m + cell // m], j[blk * m + cell % m]
            out_i[t, h, q], out_j[t, h, q] = row, col
            for a in range(r):
                out_sr[t, h, a, q] = s_row[rows_at + a * row_strides[2] + row]
                out_sc[t, h, a, q] = s_col[cols_at + a * col_strides[2] + col]


@numba.njit(cache=True, fastmath={"contract"})  # fused multiply-adds, as the reference's matmul: the same floats
def _grid_block(row_core, columns, grid):
    """grid (m*m,) = row_core (r, m) times the chosen columns' side scores (r, m)."""
    r, m = row_core.shape
    for p in range(m):
        g = grid[p * m : (p + 1) * m]
        for q in range(m):  # a vectorised loop: the same operations per cell, in the same order
            g[q] = row_core[0, p] * columns[0, q]
        for c in range(1, r):
            for q in range(m):
                g[q] += row_core[c, p] * columns[c, q]
