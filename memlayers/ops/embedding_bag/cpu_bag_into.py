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
from .cpu_dots import _dots
from .reference import check_ids

ENTRIES_PER_THREAD = 16384  # a thread scans every entry for its destinations: worth it from this many on


def bag_into_cpu(
    into: torch.Tensor, weights: torch.Tensor, read: torch.Tensor | None, table: torch.Tensor, num_out: int
) -> torch.Tensor:
    """into (T, L) int64, weights (T, L) float32, read (T, L) int64 or None (entry (t, l) reads row t), table (S, d)
    float32 -> out (num_out, d) float32."""
    out = torch.empty(num_out, table.shape[1], dtype=torch.float32)
    if out.numel():
        dest, w, src = _entries(into, weights, read)
        args = (dest, w, src, weights.shape[1], table.detach().contiguous().numpy(), out.numpy())
        # every thread scans every entry, skipping those bound elsewhere on a branch that mispredicts: worth it only
        # when the output (zeroed and written) is at least as large as the entries (2x slower than one thread at
        # 224 x 16)
        threads = threads_for(w.shape[0], ENTRIES_PER_THREAD) if out.numel() >= w.shape[0] else 1
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
    check_ids("embedding_bag", "indices", indices, values.shape[0])
    check_ids("embedding_bag", "bags", bags, num_bags)
    return bag_into_cpu(bags, weights, indices, values, num_bags)


def bag_backward_cpu(values, indices, weights, grad_out, bags=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients of a float32 bag, ``reference.value_grad``'s (N, d) and ``reference.weight_grad``'s (T, L), each
    one serial pass over the entries, the two at once on two of torch's threads; ids outside the table or bags outside
    grad_out are refused."""
    check_ids("weight_grad", "indices", indices, values.shape[0])
    check_ids("weight_grad", "bags", bags, grad_out.shape[0])
    dv, dw = torch.empty(values.shape, dtype=torch.float32), torch.empty(indices.shape, dtype=torch.float32)
    dest, w, src = _entries(indices, weights, bags)
    args = (dest, w, src, indices.shape[1], grad_out.detach().contiguous().numpy(), dv.numpy())
    values, dots = values.detach().contiguous().numpy(), dw.view(-1).numpy()
    if threads_for(2, 1) == 2:
        _grad_and_dots_at_once(*args, values, dots)
    else:
        _bag_into(*args, 0, dv.shape[0])
        _dots(dest, src, args[3], values, args[4], dots, 0, dots.shape[0])
    return dv, dw


def gather_dot_backward_cpu(table, ids, x, grad_out) -> tuple[torch.Tensor, torch.Tensor]:
    """``gather_dot``'s two gradients for float32: table (N, d), ids (T, L) int64, x (T, d), grad_out (T, L) ->
    (grad_table (N, d): the bag's value gradient, weights grad_out and rows x; grad_x (T, d): the bag over ``table``
    with weights grad_out), each one serial pass over the entries, the two at once on two of torch's threads; ids
    outside the table are refused."""
    check_ids("gather_dot", "ids", ids, table.shape[0])
    if x.shape != (ids.shape[0], table.shape[1]) or grad_out.shape != ids.shape:
        raise ValueError(f"gather_dot_backward: x {tuple(x.shape)} and grad_out {tuple(grad_out.shape)} do not fit "
                         f"table {tuple(table.shape)} and ids {tuple(ids.shape)}")  # fmt: skip
    grad_table, grad_x = torch.empty(table.shape, dtype=torch.float32), torch.empty(x.shape, dtype=torch.float32)
    dest, w, none = _entries(ids, grad_out, None)
    args = (dest, w, none, ids.shape[1], x.detach().contiguous().numpy(), grad_table.numpy())
    table = table.detach().contiguous().numpy()
    if threads_for(2, 1) == 2:
        _two_bags_at_once(*args, table, grad_x.numpy())
    else:
        _bag_into(*args, 0, grad_table.shape[0])
        _bag_into(none, w, dest, args[3], table, grad_x.numpy(), 0, grad_x.shape[0])
    return grad_table, grad_x


def _entries(into, weights, read):
    """The kernels' entry arrays: destinations, weights, sources, flat (an empty array for None: the entry's token)."""
    dest, src = (np.empty(0, np.int64) if ids is None else ids.reshape(-1).numpy() for ids in (into, read))
    return dest, weights.detach().reshape(-1).contiguous().numpy(), src


@numba.njit(parallel=True, cache=True)
def _bag_into_in_parallel(dest, w, src, L, table, out, chunks):
    n = out.shape[0]
    for c in numba.prange(chunks):
        _bag_into(dest, w, src, L, table, out, n * c // chunks, n * (c + 1) // chunks)


@numba.njit(parallel=True, cache=True)
def _grad_and_dots_at_once(dest, w, src, L, grad_out, dv, values, dw):
    """A bag's value gradient dv and weight gradient dw (``bag_backward_cpu``), one on each of two threads."""
    for task in numba.prange(2):
        if task == 0:
            _bag_into(dest, w, src, L, grad_out, dv, 0, dv.shape[0])
        else:
            _dots(dest, src, L, values, grad_out, dw, 0, dw.shape[0])


@numba.njit(parallel=True, cache=True)
def _two_bags_at_once(dest, w, src, L, table, out, table_b, out_b):
    """out = the bag of table into dest, reading src; out_b = the same entries' bag of table_b into src, reading dest;
    one on each of two threads."""
    for task in numba.prange(2):
        if task == 0:
            _bag_into(dest, w, src, L, table, out, 0, out.shape[0])
        else:
            _bag_into(src, w, dest, L, table_b, out_b, 0, out_b.shape[0])


@numba.njit(cache=True, fastmath={"contract"})  # fused multiply-adds, as torch's CPU bag: the same floats
def _bag_into(dest, w, src, L, table, out, lo, hi):
    """out[lo:hi] = the sums bound for destinations lo..hi-1, in entry order; dest (src) empty: entry e adds to (reads)
    row e // L."""
    out[lo:hi] = 0
    if dest.shape[0] == 0:  # entry e adds to row e // L: the rows' entries lie in order, the range's alone are read
        for r in range(lo, min(hi, w.shape[0] // L if L else 0)):
            row = out[r]
            for e in range(r * L, (r + 1) * L):
                read, we = table[src[e] if src.shape[0] else r], w[e]
                for x in range(row.shape[0]):
                    row[x] += we * read[x]
        return
    for e in range(w.shape[0]):
        r = dest[e]
        if r < lo or r >= hi:
            continue
        row, read, we = out[r], table[src[e] if src.shape[0] else e // L], w[e]
        for x in range(row.shape[0]):
            row[x] += we * read[x]
