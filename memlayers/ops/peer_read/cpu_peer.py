"""``reference.peer_read`` and its backward on CPU, compiled by numba, for float32 and the activations that are a
compare or nothing (``reference.FUSED_ACTIVATIONS``; erf and exp per entry in scalar code would cost more
than the passes fused away). The forward is one pass per token (each entry's dot with u, its gate, its share of v);
the backward two passes at once on two of torch's threads (v's gradient scattered in entry order; per token the gate
gradients, the weights' and x's), then u's gradient by destination. Sums within float32 rounding of the reference's
(dots in vector lanes). Optional, like ``embedding_bag/cpu_bag_into.py``: numba and ``MEMLAYERS_CPU_KERNELS``.
"""

import numba
import numpy as np
import torch

from ..embedding_bag.cpu_bag_into import bag_into_cpu
from ..embedding_bag.reference import check_ids
from ..numba_threads import threads_for
from .reference import FUSED_ACTIVATIONS

TOKENS_PER_CHUNK = 256


def peer_read_cpu(u, v, ids, weights, x, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.peer_read`` for float32 CPU tensors: (y (T, d_out), h (T, L)); ids outside the tables are refused."""
    relu = _check(u, v, ids, weights, x, activation)
    T, L = ids.shape
    y, h = torch.empty(T, v.shape[1]), torch.empty(T, L)
    if T:
        args = (_arr(ids), _arr(u), _arr(v), _arr(weights), _arr(x), relu, y.numpy(), h.numpy())
        threads = threads_for(T, TOKENS_PER_CHUNK)
        if threads > 1:
            _forward_in_parallel(*args, 4 * threads)
        else:
            _forward(*args, 0, T)
    return y, h


def peer_read_backward_cpu(u, v, ids, weights, x, h, grad, activation: str):
    """``reference.peer_read_backward`` for float32 CPU tensors: (d u, d v, d weights, d x)."""
    relu = _check(u, v, ids, weights, x, activation)
    T, L = ids.shape
    d_v, d_w, d_h, d_x = torch.empty(v.shape), torch.empty(T, L), torch.empty(T, L), torch.empty(x.shape)
    args = (_arr(ids), _arr(u), _arr(v), _arr(weights), _arr(x), _arr(h), relu, _arr(grad))
    if threads_for(2, 1) == 2:
        _backward_at_once(*args, d_v.numpy(), d_w.numpy(), d_h.numpy(), d_x.numpy())
    else:
        _value_grad(args[0], args[3], args[5], relu, args[7], d_v.numpy())
        _token_grads(*args, d_w.numpy(), d_h.numpy(), d_x.numpy(), 0, T)
    return bag_into_cpu(ids, d_h, None, x, u.shape[0]), d_v, d_w, d_x


def _check(u, v, ids, weights, x, activation: str) -> bool:
    T, L = ids.shape
    if u.shape[0] != v.shape[0] or weights.shape != (T, L) or x.shape != (T, u.shape[1]):
        raise ValueError(f"peer_read: need u (N, d_in), v (N, d_out), ids and weights (T, L), x (T, d_in), got "
                         f"{tuple(u.shape)}, {tuple(v.shape)}, {tuple(ids.shape)}, {tuple(weights.shape)}, "
                         f"{tuple(x.shape)}")  # fmt: skip
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"peer_read: the CPU kernel takes the activations {tuple(FUSED_ACTIVATIONS)}, got "
                         f"{activation!r}; use the reference")  # fmt: skip
    check_ids("peer_read", "ids", ids, u.shape[0])
    return activation == "relu"


def _arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


@numba.njit(inline="always")
def _act(h, relu):
    """relu(h) (NaN stays NaN, as torch's) or h."""
    return max(h, np.float32(0.0)) if relu and h == h else h


@numba.njit(parallel=True, cache=True)
def _forward_in_parallel(ids, u, v, w, x, relu, y, h, chunks):
    T = y.shape[0]
    for c in numba.prange(chunks):
        _forward(ids, u, v, w, x, relu, y, h, T * c // chunks, T * (c + 1) // chunks)


@numba.njit(cache=True, fastmath={"contract", "reassoc"})  # reassociation: each dot summed in vector lanes
def _forward(ids, u, v, w, x, relu, y, h, lo, hi):
    """y[t] and h[t] of the tokens lo..hi-1 (relu: True for relu, False for identity)."""
    for t in range(lo, hi):
        out, xt = y[t], x[t]
        out[:] = 0
        for e in range(ids.shape[1]):
            i = ids[t, e]
            row = u[i]
            acc = np.float32(0.0)
            for q in range(xt.shape[0]):
                acc += row[q] * xt[q]
            h[t, e] = acc
            gate, value = w[t, e] * _act(acc, relu), v[i]
            for q in range(out.shape[0]):
                out[q] += gate * value[q]


@numba.njit(parallel=True, cache=True)
def _backward_at_once(ids, u, v, w, x, h, relu, grad, d_v, d_w, d_h, d_x):
    for task in numba.prange(2):
        if task == 0:
            _value_grad(ids, w, h, relu, grad, d_v)
        else:
            _token_grads(ids, u, v, w, x, h, relu, grad, d_w, d_h, d_x, 0, ids.shape[0])


@numba.njit(cache=True, fastmath={"contract"})  # fused multiply-adds, as torch's CPU bag
def _value_grad(ids, w, h, relu, grad, d_v):
    """d_v = zeros, then every entry's gate times its token's grad added to its row, in entry order."""
    d_v[:] = 0
    for t in range(ids.shape[0]):
        g = grad[t]
        for e in range(ids.shape[1]):
            row, gate = d_v[ids[t, e]], w[t, e] * _act(h[t, e], relu)
            for q in range(row.shape[0]):
                row[q] += gate * g[q]


@numba.njit(cache=True, fastmath={"contract", "reassoc"})
def _token_grads(ids, u, v, w, x, h, relu, grad, d_w, d_h, d_x, lo, hi):
    """For the tokens lo..hi-1: each entry's gate gradient v[i] · grad[t], the weights' (times act(h)) and h's (times
    w, through the activation) gradients, and x's gradient, the bag of u's rows weighted by d_h."""
    for t in range(lo, hi):
        g, out = grad[t], d_x[t]
        out[:] = 0
        for e in range(ids.shape[1]):
            i, a = ids[t, e], h[t, e]
            value = v[i]
            d_gate = np.float32(0.0)
            for q in range(g.shape[0]):
                d_gate += value[q] * g[q]
            d_w[t, e] = d_gate * _act(a, relu)
            dh = np.float32(0.0) if relu and a <= 0 else d_gate * w[t, e]  # NaN passes, as autograd's
            d_h[t, e] = dh
            row = u[i]
            for q in range(out.shape[0]):
                out[q] += dh * row[q]
