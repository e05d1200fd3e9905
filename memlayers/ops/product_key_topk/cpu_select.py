"""The selections on CPU, compiled by numba: ``reference.product_key_select``'s function, id for id, and
``tucker.tucker_select``'s (UltraMem's; ties there go to the lower position, where torch's ``topk`` breaks them
its own way).

Optional: numba comes with ``pip install 'memlayers[cpu]'`` (the ``train`` extra includes it). Without numba,
with ``MEMLAYERS_CPU_KERNELS=0``, or for scores other than float32, the references run. They spend most of their
time in torch's CPU ``topk`` (~10 ns per score on this project's VM); here each row (a token's head) is one pass of
compiled code, and every top k of a row (``_top_k_row``) works so:

* every score's key is the reference's ordering key (order-preserving float bits, ties to the lower position);
* only the scores at or above a threshold that leaves at least k are sorted (insertion, or a full sort for more
  than 64): ``mean + z std`` of the row, z set for ~1.5 k + 8 survivors of normally distributed scores; where
  that keeps fewer than k (or is not finite), the lowest of k group maxima, which always keeps k.

The product-key grid's cells that can win (``reference.grid_candidates``) are ranked by the same keys (ties to
the lower flat id), only those at or above the k-th best of the 2k - 1 distinct cells (0, b) and (a, 0) sorted.
Rows are split over torch's threads (``numba_threads``).
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
    out = torch.empty(T, H, k, dtype=torch.int64)
    if out.numel():
        _run(_select, _select_in_parallel, _head_major(s1), _head_major(s2), k, threshold_z(n, k), out.numpy())
    return out


def tucker_select_cpu(
    a: torch.Tensor, b: torch.Tensor, s_row: torch.Tensor, s_col: torch.Tensor, core: torch.Tensor, m: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tucker.tucker_select`` for float32 CPU scores: a, b (T, H, n), s_row, s_col (T, H, r, n), core (H, r, r) ->
    the rows and columns (T, H, k) int64 of each head's k best cells, best first, ties to the lower position."""
    T, H, n = a.shape
    out_i, out_j = (torch.empty(T, H, k, dtype=torch.int64) for _ in range(2))
    if out_i.numel():
        a, b, s_row, s_col = (_head_major(x) for x in (a, b, s_row, s_col))
        z_side, z_grid = threshold_z(n, m), threshold_z((2 if m < n else 1) * m * m, k)
        core = core.detach().float().contiguous().numpy()
        _run(_tucker, _tucker_in_parallel, a, b, s_row, s_col, core, m, k, z_side, z_grid, out_i.numpy(), out_j.numpy())
    return out_i, out_j


def _head_major(x: torch.Tensor):
    """x (T, H, ...) -> a C-contiguous array (H*T, ...), row h*T + t: free for the scores' einsums, whose outputs
    are laid out head-major (a copy otherwise); the kernels are fastest on contiguous rows."""
    return x.detach().transpose(0, 1).contiguous().flatten(0, 1).numpy()


def _run(kernel, parallel_kernel, first, *args) -> None:
    """``kernel(first, *args, 0)`` over all rows (first.shape[0]) on this thread, or ``parallel_kernel`` over chunks of
    rows on min(torch's threads, rows / ROWS_PER_CHUNK) threads."""
    threads = threads_for(first.shape[0], ROWS_PER_CHUNK)
    if threads == 1:
        kernel(first, *args, 0)
    else:
        parallel_kernel(first, *args, 4 * threads)


@numba.njit(inline="always")
def _ordered(x):
    """float32 -> int64 in float order (the reference's ``_order_keys`` high half): -0.0 ties +0.0."""
    bits = np.int64(np.float32(x + np.float32(0.0)).view(np.int32))
    return bits ^ ((bits >> 63) & 0x7FFFFFFF)


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
    """out[:k] = the ties (low 32 bits, inverted) of the k largest of keys[:c], c >= k, largest first."""
    _sort_descending(keys, c)
    for q in range(k):
        out[q] = LOW32 - (keys[q] & LOW32)


@numba.njit(fastmath={"reassoc", "contract"})
def _moments(x, sign):
    s = np.float32(0.0)
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        s += x[j]
        ss += x[j] * x[j]
    mean = s / x.shape[0]
    return sign * mean, ss / x.shape[0] - mean * mean


@numba.njit(inline="always")
def _keep_at_or_above(x, sign, tau, keys):
    """keys[:c] = the keys of the scores sign * x[j] at or above the ordered value tau, in position order; -> c."""
    c = 0
    for j in range(x.shape[0]):  # branch-free: every key is written, c advances past the kept ones
        o = _ordered(sign * x[j])
        keys[c] = (o << 32) | (LOW32 - j)
        c += o >= tau
    return c


@numba.njit(inline="always")
def _top_k_row(x, k, z, keys, out, sign=np.float32(1.0)):
    """out[:k] = positions of the k best scores sign * x[j] of the row x (n,), best first, ties to the lower position
    (keys: scratch of n); z: ``threshold_z(n, k)``."""
    n = x.shape[0]
    c = 0
    if z > -np.inf:
        mean, var = _moments(x, sign)
        t = mean + np.float32(z) * np.sqrt(var)  # NaN for NaN or inf scores, or a negative rounded var
        if np.isfinite(t):
            c = _keep_at_or_above(x, sign, _ordered(np.float32(t)), keys)
    if c < k:  # no spread threshold, or it kept too few: the lowest of k group maxima keeps at least k
        bound = NO_BOUND
        for g in range(k):
            top = _ordered(sign * x[g * n // k])
            for j in range(g * n // k + 1, (g + 1) * n // k):
                top = max(top, _ordered(sign * x[j]))
            bound = min(bound, top)
        c = _keep_at_or_above(x, sign, bound, keys)
    _best(keys, c, k, out)


@numba.njit(parallel=True, cache=True)
def _select_in_parallel(s1, s2, k, z, out, chunks):
    rows = s1.shape[0]
    for c in numba.prange(chunks):
        lo, hi = rows * c // chunks, rows * (c + 1) // chunks
        _select(s1[lo:hi], s2[lo:hi], k, z, out, lo)


@numba.njit(cache=True)
def _select(s1, s2, k, z, out, first_row):
    """s1, s2 (R, n): rows first_row + r of (H*T) (``_head_major``) -> out (T, H, k) at those rows'
    (token, head): ``product_key_select_cpu``."""
    rows, n = s1.shape
    tokens = out.shape[0]
    keys = np.empty(max(n, k * k), np.int64)
    i = np.empty(k, np.int64)
    j = np.empty(k, np.int64)
    edge = np.empty(2 * k - 1, np.int64)
    for r in range(rows):
        x1, x2 = s1[r], s2[r]
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
        g = first_row + r
        _best(keys, c, k, out[g % tokens, g // tokens])


@numba.njit(parallel=True, cache=True)
def _tucker_in_parallel(a, b, s_row, s_col, core, m, k, z_side, z_grid, out_i, out_j, chunks):
    rows = a.shape[0]
    for c in numba.prange(chunks):
        lo, hi = rows * c // chunks, rows * (c + 1) // chunks
        _tucker(a[lo:hi], b[lo:hi], s_row[lo:hi], s_col[lo:hi], core, m, k, z_side, z_grid, out_i, out_j, lo)


@numba.njit(cache=True)
def _tucker(a, b, s_row, s_col, core, m, k, z_side, z_grid, out_i, out_j, first_row):
    """a, b (R, n), s_row, s_col (R, r, n): rows first_row + row of (H*T) (``_head_major``), core (H, r, r) ->
    out_i, out_j (T, H, k) at those rows' (token, head): each head's top (and bottom) m rows and columns, its m x m
    grids, their best k cells (``tucker.tucker_select``, with its floats: the core applied to the rows first, sums
    over ranks in rank order)."""
    rows, n = a.shape
    tokens, r = out_i.shape[0], core.shape[1]
    blocks = 2 if m < n else 1
    cells = blocks * m * m
    keys = np.empty(max(n, cells), np.int64)
    i = np.empty(blocks * m, np.int64)
    j = np.empty(blocks * m, np.int64)
    row_core = np.empty((r, m), np.float32)
    grid = np.empty(cells, np.float32)
    top_i = np.zeros(n, np.bool_)
    top_j = np.zeros(n, np.bool_)
    best = np.empty(k, np.int64)
    for row in range(rows):
        t, h = (first_row + row) % tokens, (first_row + row) // tokens
        _top_k_row(a[row], m, z_side, keys, i[:m])
        _top_k_row(b[row], m, z_side, keys, j[:m])
        if blocks == 2:  # the bottom m: the top m of the negated scores (ascending, ties to the lower position)
            _top_k_row(a[row], m, z_side, keys, i[m:], np.float32(-1.0))
            _top_k_row(b[row], m, z_side, keys, j[m:], np.float32(-1.0))
        for blk in range(blocks):
            for p in range(m):
                for c in range(r):
                    acc = s_row[row, 0, i[blk * m + p]] * core[h, 0, c]
                    for e in range(1, r):
                        acc += s_row[row, e, i[blk * m + p]] * core[h, e, c]
                    row_core[c, p] = acc
            _grid_block(row_core, s_col[row], j[blk * m : (blk + 1) * m], grid[blk * m * m : (blk + 1) * m * m])
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
        _top_k_row(grid, k, z_grid, keys, best)
        for q in range(k):
            blk, cell = best[q] // (m * m), best[q] % (m * m)
            out_i[t, h, q] = i[blk * m + cell // m]
            out_j[t, h, q] = j[blk * m + cell % m]


@numba.njit(cache=True, fastmath={"contract"})  # fused multiply-adds, as the reference's matmul: the same floats
def _grid_block(row_core, s_col, j, grid):
    """grid (m*m,) = row_core (r, m) times the side scores s_col (r, n) at the columns j (m,)."""
    r, m = row_core.shape
    for p in range(m):
        for q in range(m):
            acc = row_core[0, p] * s_col[0, j[q]]
            for c in range(1, r):
                acc += row_core[c, p] * s_col[c, j[q]]
            grid[p * m + q] = acc
