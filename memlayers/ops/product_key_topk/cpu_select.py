"""The exact selection on CPU, compiled by numba: ``reference.product_key_select``'s function, id for id.

Optional: numba comes with ``pip install 'memlayers[cpu]'`` (the ``train`` extra includes it). Without numba,
with ``MEMLAYERS_CPU_KERNELS=0``, or for scores other than float32, the reference runs. The reference spends
most of its time in torch's CPU ``topk`` (3 calls per selection, ~10 ns per score on this project's VM); this
does each row (a token's head) in one pass of compiled code:

* each half's top k: every score becomes the reference's ordering key (order-preserving float bits, ties to
  the lower position); only the scores at or above a threshold that leaves at least k are sorted (insertion,
  or a full sort for more than 64). The threshold is the larger of the lowest of k group maxima (k scores are
  at or above it: always valid) and ``mean + z std`` of the row (z set for ~1.5 k + 8 survivors of normally
  distributed scores); when the latter leaves fewer than k, the former is used;
* the grid cells that can win (``reference.grid_candidates``), their float32 sums ranked by the same keys
  (ties to the lower flat id), only those at or above the lowest sum of the k distinct cells (0, b) or (a, 0)
  (the k-th best sum cannot be lower) sorted.

Rows are split over ``torch.get_num_threads()`` threads of numba's OpenMP layer, which shares torch's OpenMP
runtime and pool. Like torch's own parallel ops, that pool does not survive a fork: a forked child that runs
torch on one thread (as DataLoader workers do) runs this on its own thread.
"""

import math
import os
import statistics

import numba
import numpy as np
import torch

if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    # OpenMP first: numba's OpenMP layer then runs in torch's own libgomp thread pool (one runtime loaded once),
    # instead of a second pool whose threads would compete with torch's spinning ones for the cores
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

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
    rows = T * H
    if rows == 0:
        return out
    a, b = (s.detach().contiguous().view(rows, n).numpy() for s in (s1, s2))
    o, z = out.view(rows, k).numpy(), threshold_z(n, k)
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, -(-rows // ROWS_PER_CHUNK))
    if threads <= 1:  # no thread pool touched (a forked child with torch on one thread stays safe)
        _select(a, b, k, z, o)
    else:
        numba.set_num_threads(threads)
        _select_rows_in_parallel(a, b, k, z, o, min(4 * threads, -(-rows // ROWS_PER_CHUNK)))
    return out


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
        keys[:c] = keys[:c][::-1].copy()
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
def _moments(x):
    s = np.float32(0.0)
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        s += x[j]
        ss += x[j] * x[j]
    mean = s / x.shape[0]
    return mean, ss / x.shape[0] - mean * mean


@numba.njit(inline="always")
def _half_top_k(x, k, z, u, keys, out):
    """out[:k] = positions of the k best scores of the row x (n,), best first, ties to the lower position."""
    n = x.shape[0]
    for j in range(n):
        u[j] = _ordered(x[j])
    bound = NO_BOUND  # the lowest of k group maxima: k scores are at or above it
    for g in range(k):
        m = u[g * n // k]
        for j in range(g * n // k + 1, (g + 1) * n // k):
            m = max(m, u[j])
        bound = min(bound, m)
    tau = bound
    if z > -np.inf:
        mean, var = _moments(x)
        t = mean + np.float32(z) * np.sqrt(var)  # NaN for NaN or inf scores, or a negative rounded var
        if np.isfinite(t):
            tau = max(bound, _ordered(np.float32(t)))
    c = 0
    for _ in range(2):
        c = 0
        for j in range(n):  # branch-free: every key is written, c advances past the kept ones
            keys[c] = (u[j] << 32) | (LOW32 - j)
            c += u[j] >= tau
        if c >= k:
            break
        tau = bound
    _best(keys, c, k, out)


@numba.njit(parallel=True, cache=True)
def _select_rows_in_parallel(s1, s2, k, z, out, chunks):
    rows = s1.shape[0]
    for c in numba.prange(chunks):
        lo, hi = rows * c // chunks, rows * (c + 1) // chunks
        _select(s1[lo:hi], s2[lo:hi], k, z, out[lo:hi])


@numba.njit(cache=True)
def _select(s1, s2, k, z, out):
    rows, n = s1.shape
    u = np.empty(n, np.int64)
    keys = np.empty(max(n, k * k), np.int64)
    i = np.empty(k, np.int64)
    j = np.empty(k, np.int64)
    edge = np.empty(2 * k - 1, np.int64)
    for r in range(rows):
        x1, x2 = s1[r], s2[r]
        _half_top_k(x1, k, z, u, keys, i)
        _half_top_k(x2, k, z, u, keys, j)
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
        _best(keys, c, k, out[r])
