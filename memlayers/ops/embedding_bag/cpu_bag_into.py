"""Bags by destination on CPU, compiled by numba: ``out[into[e]] += weights[e] * table[read[e]]`` over the entries
e in order, for float32. Two of the reference's sorted bags are this function:

* the dense value gradient (``reference.value_grad``): into = the entries' rows, read = their tokens (or bags),
  table = grad_out;
* the keyed bag forward (``reference.bag_forward`` with ``bags``): into = the bags, read = the rows, table = the
  values.

The reference sorts the entries by destination (a stable sort, a search for every destination's first entry,
then one torch bag per destination); here each of torch's threads owns a range of destinations, zeroes it and
adds every entry bound there, in entry order (the reference's order: deterministic, whatever the threads).
Entries whose destination is outside [0, num_out) add nowhere. Optional, like ``product_key_topk/cpu_select.py``:
numba and ``MEMLAYERS_CPU_KERNELS``.
"""

import numba
import numpy as np
import torch

from ..numba_threads import threads_for

ENTRIES_PER_THREAD = 16384  # a thread scans every entry for its destinations: worth it from this many on


def bag_into_cpu(
    into: torch.Tensor, weights: torch.Tensor, read: torch.Tensor | None, table: torch.Tensor, num_out: int
) -> torch.Tensor:
    """into (T, L) int64, weights (T, L) float32, read (T, L) int64 or None (entry (t, l) reads row t), table (S, d)
    float32 -> out (num_out, d) float32."""
    out = torch.empty(num_out, table.shape[1], dtype=torch.float32)
    if out.numel() == 0:
        return out
    dest = into.reshape(-1).numpy()
    src = np.empty(0, np.int64) if read is None else read.reshape(-1).numpy()
    w = weights.detach().reshape(-1).contiguous().numpy()
    args = (dest, w, src, into.shape[1], table.detach().contiguous().numpy(), out.numpy())
    # every thread scans every entry, skipping those bound elsewhere on a branch that mispredicts: worth it only when
    # the output (zeroed and written) is at least as large as the entries (2x slower than one thread at 224 x 16)
    threads = threads_for(dest.shape[0], ENTRIES_PER_THREAD) if out.numel() >= dest.shape[0] else 1
    if threads == 1:
        _bag_into(*args, 0, num_out)
    else:
        _bag_into_in_parallel(*args, threads)
    return out


def value_grad_cpu(indices, weights, grad_out, num_rows: int, bags=None) -> torch.Tensor:
    """``reference.value_grad``: indices (T, L), weights (T, L), grad_out (T, d) (or (num_bags, d) with ``bags``)
    -> (num_rows, d) float32."""
    return bag_into_cpu(indices, weights, bags, grad_out, num_rows)


def keyed_bag_cpu(values, indices, weights, bags, num_bags: int) -> torch.Tensor:
    """``reference.bag_forward`` with ``bags``: values (N, d), indices, weights, bags (T, L) -> (num_bags, d); ids
    outside the table or bags outside [0, num_bags) are refused, as the reference refuses them."""
    for name, ids, bound in (("indices", indices, values.shape[0]), ("bags", bags, num_bags)):
        if ids.numel():
            lo, hi = torch.aminmax(ids)
            if lo < 0 or hi >= bound:
                raise IndexError(f"embedding_bag: {name} must be in [0, {bound}), got [{lo}, {hi}]")
    return bag_into_cpu(bags, weights, indices, values, num_bags)


@numba.njit(parallel=True, cache=True)
def _bag_into_in_parallel(dest, w, src, L, table, out, chunks):
    n = out.shape[0]
    for c in numba.prange(chunks):
        _bag_into(dest, w, src, L, table, out, n * c // chunks, n * (c + 1) // chunks)


@numba.njit(cache=True, fastmath={"contract"})  # fused multiply-adds, as torch's CPU bag: the same floats
def _bag_into(dest, w, src, L, table, out, lo, hi):
    """out[lo:hi] = the sums bound for destinations lo..hi-1; src empty: entry e reads row e // L."""
    d = table.shape[1]
    out[lo:hi] = 0
    for e in range(dest.shape[0]):
        r = dest[e]
        if r < lo or r >= hi:
            continue
        s = src[e] if src.shape[0] else e // L
        we = w[e]
        for x in range(d):
            out[r, x] += we * table[s, x]
