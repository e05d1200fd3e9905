"""``reference.cell_scores``, its backward and ``reference.side_scores_backward`` on CPU, compiled by numba, for
float32: one pass over the selected slots instead of torch's ~10 small ops each way.

Each score sums ``(sr[a] sc[b]) cores[c, a, b]`` over (a, b) in row-major order, the gradients in orders of their own:
within float32 rounding of the reference's. The cores' gradient is summed in a fixed number of token chunks, then over
the chunks in order: the same floats on any number of threads. The side scores' backward makes the queries' gradient
(per token) and the keys' (scattered in token order, the reference's) at once on two threads. Optional, like
``embedding_bag/cpu_bag_into.py``: numba and ``MEMLAYERS_CPU_KERNELS``.
"""

import numba
import numpy as np
import torch

from ..embedding_bag.reference import check_ids
from ..numba_threads import threads_for

CHUNKS = 8  # token chunks of the cores' gradient, whatever the threads


def cell_scores_cpu(sr: torch.Tensor, sc: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """sr, sc (T, H, r, k), cores (C, H, r, r), float32 -> scores (T, H, C, k)."""
    _check(sr, sc, cores)
    T, H, _, k = sr.shape
    out = torch.empty(T, H, cores.shape[0], k)
    if out.numel():
        args = (_arr(sr), _arr(sc), _arr(cores), out.numpy())
        if threads_for(T * H * k, 4096) > 1:
            _scores_in_parallel(*args)
        else:
            _scores(*args, 0, T)
    return out


def cell_scores_backward_cpu(sr, sc, cores, grad) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.cell_scores_backward`` for float32: (d sr, d sc (T, H, r, k), d cores (C, H, r, r))."""
    _check(sr, sc, cores)
    if grad.shape != (sr.shape[0], sr.shape[1], cores.shape[0], sr.shape[3]):
        raise ValueError(f"tucker_cells: grad {tuple(grad.shape)} does not fit sr {tuple(sr.shape)} and cores "
                         f"{tuple(cores.shape)}")  # fmt: skip
    d_sr, d_sc = torch.empty(sr.shape), torch.empty(sc.shape)
    partial = torch.empty(CHUNKS, *cores.shape)
    args = (_arr(sr), _arr(sc), _arr(cores), _arr(grad), d_sr.numpy(), d_sc.numpy(), partial.numpy())
    if threads_for(grad.numel(), 4096) > 1:
        _backward_in_parallel(*args)
    else:
        for chunk in range(CHUNKS):
            _backward(*args, chunk)
    return d_sr, d_sc, partial.sum(0)


def side_scores_backward_cpu(q, keys, i, j, g_row, g_col) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.side_scores_backward`` for float32: q (T, H, Q, 2, d), keys (H, 2, r, n, d), i, j (T, H, k) int64,
    g_row, g_col (T, H, r, k) -> (dq, dkeys); rows outside the keys are refused."""
    (T, H, Q, _, d), (r, n) = q.shape, keys.shape[2:4]
    k = i.shape[2]
    if (
        keys.shape != (H, 2, r, n, d)
        or r % Q
        or not i.shape == j.shape == (T, H, k)
        or not g_row.shape == g_col.shape == (T, H, r, k)
    ):
        raise ValueError(f"tucker_sides_backward: need q (T, H, Q, 2, d), keys (H, 2, r, n, d), i, j (T, H, k) and "
                         f"g_row, g_col (T, H, r, k), got {tuple(q.shape)}, {tuple(keys.shape)}, {tuple(i.shape)}, "
                         f"{tuple(j.shape)}, {tuple(g_row.shape)}, {tuple(g_col.shape)}")  # fmt: skip
    for name, ids in (("i", i), ("j", j)):
        check_ids("tucker_sides_backward", name, ids, n)
    d_q, d_keys = torch.empty(q.shape), torch.empty(keys.shape)
    args = (_arr(q), _arr(keys), _arr(i), _arr(j), _arr(g_row), _arr(g_col), d_q.numpy(), d_keys.numpy())
    if threads_for(2, 1) == 2:
        _sides_at_once(*args)
    else:
        _side_grads(*args[:6], args[6], False)
        _side_grads(*args[:6], args[7], True)
    return d_q, d_keys


def _check(sr, sc, cores) -> None:
    H, r = sr.shape[1:3]
    if sc.shape != sr.shape or cores.dim() != 4 or cores.shape[1:] != (H, r, r):
        raise ValueError(f"tucker_cells: need sr, sc (T, H, r, k) of one shape and cores (C, H, r, r), got "
                         f"{tuple(sr.shape)}, {tuple(sc.shape)}, {tuple(cores.shape)}")  # fmt: skip


def _arr(x: torch.Tensor) -> np.ndarray:
    return x.detach().contiguous().numpy()


@numba.njit(parallel=True, cache=True)
def _scores_in_parallel(sr, sc, cores, out):
    T = sr.shape[0]
    for chunk in numba.prange(CHUNKS):
        _scores(sr, sc, cores, out, T * chunk // CHUNKS, T * (chunk + 1) // CHUNKS)


@numba.njit(cache=True)
def _scores(sr, sc, cores, out, lo, hi):
    """out[lo:hi] (tokens) = the cell scores of tokens lo..hi-1."""
    _, H, r, k = sr.shape
    for t in range(lo, hi):
        for h in range(H):
            for c in range(cores.shape[0]):
                for q in range(k):
                    acc = np.float32(0.0)
                    for a in range(r):
                        for b in range(r):
                            acc += (sr[t, h, a, q] * sc[t, h, b, q]) * cores[c, h, a, b]
                    out[t, h, c, q] = acc


@numba.njit(parallel=True, cache=True)
def _backward_in_parallel(sr, sc, cores, grad, d_sr, d_sc, partial):
    for chunk in numba.prange(CHUNKS):
        _backward(sr, sc, cores, grad, d_sr, d_sc, partial, chunk)


@numba.njit(cache=True)
def _backward(sr, sc, cores, grad, d_sr, d_sc, partial, chunk):
    """The gradients of token chunk ``chunk`` (of CHUNKS): d_sr, d_sc at its tokens, and its part of the cores'
    gradient into partial[chunk]."""
    T, H, r, k = sr.shape
    C = cores.shape[0]
    partial[chunk] = 0
    for t in range(T * chunk // CHUNKS, T * (chunk + 1) // CHUNKS):
        for h in range(H):
            for q in range(k):
                for a in range(r):
                    acc = np.float32(0.0)
                    for c in range(C):
                        g = grad[t, h, c, q]
                        for b in range(r):
                            acc += g * cores[c, h, a, b] * sc[t, h, b, q]
                    d_sr[t, h, a, q] = acc
                for b in range(r):
                    acc = np.float32(0.0)
                    for c in range(C):
                        g = grad[t, h, c, q]
                        for a in range(r):
                            acc += g * cores[c, h, a, b] * sr[t, h, a, q]
                    d_sc[t, h, b, q] = acc
                for c in range(C):
                    g = grad[t, h, c, q]
                    for a in range(r):
                        ga = g * sr[t, h, a, q]
                        for b in range(r):
                            partial[chunk, c, h, a, b] += ga * sc[t, h, b, q]


@numba.njit(parallel=True, cache=True)
def _sides_at_once(q, keys, i, j, g_row, g_col, d_q, d_keys):
    for task in numba.prange(2):
        if task == 0:
            _side_grads(q, keys, i, j, g_row, g_col, d_q, False)
        else:
            _side_grads(q, keys, i, j, g_row, g_col, d_keys, True)


@numba.njit(cache=True, fastmath={"contract"})  # fused multiply-adds, as torch's CPU bag
def _side_grads(q, keys, i, j, g_row, g_col, out, into_keys):
    """One pass over every chosen (token, head, side, rank, k) in order, its gradient g times the other factor:
    into_keys False: out = d_q, ``d_q[t, h, a // (r / Q), side] += g keys[h, side, a, chosen]``; True: out = d_keys,
    ``d_keys[h, side, a, chosen] += g q[t, h, a // (r / Q), side]`` (tokens in order, the reference's)."""
    T, H, Q = q.shape[:3]
    r, k = keys.shape[2], i.shape[2]
    out[:] = 0
    for t in range(T):
        for h in range(H):
            for side in range(2):
                chosen, g = (i, g_row) if side == 0 else (j, g_col)
                for a in range(r):
                    query = a // (r // Q)
                    for kk in range(k):
                        key, w = chosen[t, h, kk], g[t, h, a, kk]
                        if into_keys:
                            dst, src = out[h, side, a, key], q[t, h, query, side]
                        else:
                            dst, src = out[t, h, query, side], keys[h, side, a, key]
                        for x in range(dst.shape[0]):
                            dst[x] += w * src[x]
