"""The selected scores with a backward that touches only the selected sub-keys.

``scores[t, h, r] = q1[t, h] . K1[h, i[t, h, r]] + q2[t, h] . K2[h, j[t, h, r]]``. Autograd through
``einsum`` + ``gather`` would scatter the output gradient into dense (T, H, n) score gradients and
run two GEMMs with them per half (2 T H n h multiply-adds each). Here, per half:

    dq1[t, h] = sum_r g[t, h, r] K1[h, i[t, h, r]]          (a weighted bag of k gathered rows)
    dK1[h, i] = sum over (t, r) with i[t, h, r] = i of g[t, h, r] q1[t, h]   (its transpose)

both from one ``F.embedding_bag`` over the H*n rows of K1 (its forward is dq1, its weight gradient
for the upstream gradient q1 is dK1): T H k h multiply-adds each, no (T, H, n) or (T, H, k, h) tensor.
Plain torch, so CPU and CUDA alike.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _half_grads(ids, keys, g, q, need_q: bool, need_keys: bool):
    """dq (T, H, h) and dK (H, n, h) of one half: ids (T, H, k) sub-key ids, keys (H, n, h), g (T, H, k),
    q (T, H, h); None where not needed."""
    T, H, k = ids.shape
    n, h = keys.shape[1:]
    bags = (ids + torch.arange(H, device=ids.device)[:, None] * n).view(T * H, k)  # rows of keys.view(H * n, h)
    table = keys.detach().reshape(H * n, h).requires_grad_(need_keys)
    with torch.enable_grad():
        dq = F.embedding_bag(bags, table, per_sample_weights=g.reshape(T * H, k), mode="sum")
    dkeys = torch.autograd.grad(dq, table, q.reshape(T * H, h))[0].view(H, n, h) if need_keys else None
    return (dq.detach().view(T, H, h) if need_q else None), dkeys


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
