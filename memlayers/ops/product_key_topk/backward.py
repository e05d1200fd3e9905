"""The selected scores with a backward that touches only the selected sub-keys.

``scores[t, h, r] = q1[t, h] . K1[h, i[t, h, r]] + q2[t, h] . K2[h, j[t, h, r]]``. Autograd through
``einsum`` + ``gather`` would scatter the output gradient into dense (T, H, n) score gradients and
run two GEMMs with them per half (2 T H n h multiply-adds each). Here, per half:

    dq1[t, h] = sum_r g[t, h, r] K1[h, i[t, h, r]]          (a weighted bag of k gathered rows)
    dK1[h, i] = sum over (t, r) with i[t, h, r] = i of g[t, h, r] q1[t, h]   (its transpose)

both an embedding bag over the H*n rows of K1 (dq1 its forward, dK1 its value gradient for the upstream
gradient q1): T H k h multiply-adds each, no (T, H, n) or (T, H, k, h) tensor. The bag's custom ops, so
``torch.compile`` traces the backward too and CUDA runs the bag's Triton kernels.
"""

import torch
from torch.autograd.function import once_differentiable

from ..embedding_bag import library as bag


def _half_grads(ids, keys, g, q, need_q: bool, need_keys: bool):
    """dq (T, H, h) and dK (H, n, h) of one half: ids (T, H, k) sub-key ids, keys (H, n, h), g (T, H, k),
    q (T, H, h); None where not needed. The bag's custom ops (Triton on CUDA), in the keys' dtype."""
    T, H, k = ids.shape
    n, h = keys.shape[1:]
    bags = (ids + torch.arange(H, device=ids.device)[:, None] * n).view(T * H, k)  # rows of keys.view(H * n, h)
    table, weights = keys.detach().reshape(H * n, h), g.reshape(T * H, k).to(keys.dtype)
    dq = bag.bag(table, bags, weights, "auto", "sorted").view(T, H, h).to(q.dtype) if need_q else None
    if not need_keys:
        return dq, None
    grad_out = q.reshape(T * H, h).to(keys.dtype)
    dkeys = bag.bag_backward(table, bags, weights, grad_out, "auto", "sorted", True, False)[0]
    return dq, dkeys.view(H, n, h)


class _SelectedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q1, q2, keys1, keys2, s1, s2, i, j):
        ctx.save_for_backward(q1, q2, keys1, keys2, i, j)
        return s1.gather(-1, i) + s2.gather(-1, j)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        q1, q2, keys1, keys2, i, j = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq1, dkeys1 = _half_grads(i, keys1, g, q1, need[0], need[2])
        dq2, dkeys2 = _half_grads(j, keys2, g, q2, need[1], need[3])
        return dq1, dq2, dkeys1, dkeys2, None, None, None, None


def selected_scores(q1, q2, keys1, keys2, s1, s2, i, j) -> torch.Tensor:
    """The scores of the selected product keys, differentiable in q1, q2, keys1, keys2.

    q1, q2 (T, H, h); keys1, keys2 (H, n, h); s1, s2 (T, H, n) their sub-key scores (values only: not
    differentiated); i, j (T, H, k) int64 sub-key ids -> ``s1.gather(-1, i) + s2.gather(-1, j)`` (T, H, k),
    the very floats the reference returns, with the gather backward of the module docstring.
    """
    return _SelectedScores.apply(q1, q2, keys1, keys2, s1.detach(), s2.detach(), i, j)
