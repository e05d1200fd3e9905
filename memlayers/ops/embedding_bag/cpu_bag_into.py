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
from .reference import check_ids

ENTRIES_PER_THREAD = 16384  # a thread scans every entry for its destinations: worth it from this many on


def bag_into_cpu(
    into: torch.Tensor,
    weights: torch.Tensor,
    read: torch.Tensor | None,
    table: torch.Tensor,
    num_out: int,
    dot_with: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """into (T, L) int64, weights (T, L) float32, read (T, L) int64 or None (entry (t, l) reads row t), table (S, d)
    float32 -> out (num_out, d) float32, and with ``dot_with`` (num_out, d) float32 also each entry's
    ``dot_with[into[e]] · table[read[e]]`` (T, L) (the bag's weight gradient, from the same pass), else None."""
    out = torch.empty(num_out, table.shape[1], dtype=torch.float32)
    dots = None if dot_with is None else torch.empty(into.shape, dtype=torch.float32)
    if out.numel() == 0:
        return out, None if dots is None else dots.zero_()
    dest = into.reshape(-1).numpy()
    src = np.empty(0, np.int64) if read is None else read.reshape(-1).numpy()
    w = weights.detach().reshape(-1).contiguous().numpy()
    dot_args = (np.empty((0, 0), np.float32), np.empty(0, np.float32))
    if dots is not None:
        dot_args = (dot_with.detach().contiguous().numpy(), dots.view(-1).numpy())
    args = (dest, w, src, into.shape[1], table.detach().contiguous().numpy(), out.numpy(), *dot_args)
    # every thread scans every entry, skipping those bound elsewhere on a branch that mispredicts: worth it only when
    # the output (zeroed and written) is at least as large as the entries (2x slower than one thread at 224 x 16)
    threads = threads_for(dest.shape[0], ENTRIES_PER_THREAD) if out.numel() >= dest.shape[0] else 1
    if threads == 1:
        _bag_into(*args, 0, num_out)
    else:
        _bag_into_in_parallel(*args, threads)
    return out, dots


def value_grad_cpu(indices, weights, grad_out, num_rows: int, bags=None) -> torch.Tensor:
    """``reference.value_grad``: indices (T, L), weights (T, L), grad_out (T, d) (or (num_bags, d) with ``bags``)
    -> (num_rows, d) float32."""
    return bag_into_cpu(indices, weights, bags, grad_out, num_rows)[0]


def bag_backward_cpu(values, indices, weights, grad_out, bags=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients of a float32 bag from one pass over the entries: (``reference.value_grad``'s (N, d),
    ``reference.weight_grad``'s (T, L)), each entry's dot taken where its value row's gradient is made; ids outside
    the table or bags outside grad_out are refused (an entry bound nowhere would get no dot)."""
    check_ids("weight_grad", "indices", indices, values.shape[0])
    check_ids("weight_grad", "bags", bags, grad_out.shape[0])
    return bag_into_cpu(indices, weights, bags, grad_out, values.shape[0], dot_with=values)


def keyed_bag_cpu(values, indices, weights, bags, num_bags: int) -> torch.Tensor:
    """``reference.bag_forward`` with ``bags``: values (N, d), indices, weights, bags (T, L) -> (num_bags, d); ids
    outside the table or bags outside [0, num_bags) are refused, as the reference refuses them."""
    check_ids("embedding_bag", "indices", indices, values.shape[0])
    check_ids("embedding_bag", "bags", bags, num_bags)
    return bag_into_cpu(bags, weights, indices, values, num_bags)[0]


@numba.njit(parallel=True, cache=True)
def _bag_into_in_parallel(dest, w, src, L, table, out, dot_with, dots, chunks):
    n = out.shape[0]
    for c in numba.prange(chunks):
        _bag_into(dest, w, src, L, table, out, dot_with, dots, n * c // chunks, n * (c + 1) // chunks)


# fused multiply-adds, as torch's CPU bag: the same floats; reassociation for the dots only (their sums in vector lanes:
# an out row's sums run over the entries, an order no compiler may change)
@numba.njit(cache=True, fastmath={"contract", "reassoc"})
def _bag_into(dest, w, src, L, table, out, dot_with, dots, lo, hi):
    """out[lo:hi] = the sums bound for destinations lo..hi-1, and (dot_with not empty) dots[e] = dot_with[dest[e]] ·
    table[src[e]] for those entries; src empty: entry e reads row e // L."""
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
        if dot_with.shape[0]:
            acc = np.float32(0.0)
            for x in range(d):
                acc += dot_with[r, x] * table[s, x]
            dots[e] = acc
