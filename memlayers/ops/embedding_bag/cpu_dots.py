"""The bag's per-entry dot products on CPU, compiled by numba, for float32: ``dots[t, l] = table[indices[t, l]] · x[t]``
(``x[bags[t, l]]`` with ``bags``), the bag's weight gradient (``reference.weight_grad``) and ``gather_dot``'s forward.

Each dot is summed in vector lanes, an order of its own: within float32 rounding of the reference's (torch's per-entry
dot products, 2-4x slower here). Entries are split over torch's threads (``numba_threads``). Optional, like
``cpu_bag_into.py``: numba and ``MEMLAYERS_CPU_KERNELS``.
"""

import numba
import numpy as np
import torch

from ..numba_threads import threads_for
from .reference import check_ids

ENTRIES_PER_THREAD = 8192


def dots_cpu(table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, bags: torch.Tensor | None = None):
    """table (N, d) float32, indices (T, L) int64, x (T, d) float32 (or (num_bags, d) with ``bags`` (T, L) int64)
    -> (T, L) float32. Rows outside the table (or bags outside x) are refused: the kernel reads without checks."""
    T, L = indices.shape
    if x.dim() != 2 or x.shape[1] != table.shape[1] or (bags is None and x.shape[0] != T):
        raise ValueError(
            f"weight_grad: x {tuple(x.shape)} does not fit table {tuple(table.shape)} and indices {(T, L)}"
        )
    check_ids("weight_grad", "indices", indices, table.shape[0])
    check_ids("weight_grad", "bags", bags, x.shape[0])
    out = torch.empty(T, L, dtype=torch.float32)
    if out.numel():
        src = np.empty(0, np.int64) if bags is None else bags.reshape(-1).numpy()
        args = (
            indices.reshape(-1).numpy(),
            src,
            L,
            table.detach().contiguous().numpy(),
            x.detach().contiguous().numpy(),
        )
        threads = threads_for(T * L, ENTRIES_PER_THREAD)
        if threads == 1:
            _dots(*args, out.view(-1).numpy(), 0, T * L)
        else:
            _dots_in_parallel(*args, out.view(-1).numpy(), threads)
    return out


@numba.njit(parallel=True, cache=True)
def _dots_in_parallel(ids, src, L, table, x, out, chunks):
    n = out.shape[0]
    for c in numba.prange(chunks):
        _dots(ids, src, L, table, x, out, n * c // chunks, n * (c + 1) // chunks)


@numba.njit(cache=True, fastmath={"reassoc", "contract"})  # reassociation: each dot summed in vector lanes
def _dots(ids, src, L, table, x, out, lo, hi):
    """out[lo:hi] = the dots of the flat entries lo..hi-1; src empty: entry e reads x[e // L]."""
    d = table.shape[1]
    for e in range(lo, hi):
        row, other = table[ids[e]], x[src[e] if src.shape[0] else e // L]
        acc = np.float32(0.0)
        for q in range(d):
            acc += row[q] * other[q]
        out[e] = acc
