"""Exact product-key top-k in plain PyTorch.

Per head, the N = n*n full keys are the concatenations ``[K1[i], K2[j]]``, with score
``s1[i] + s2[j]`` where ``s1 = K1 q1`` and ``s2 = K2 q2``. The best k full keys always lie in
the k x k grid of each half's own top k, so only ``2n + k*k`` scores are ever formed.

Ties are broken by the smaller flat index ``i*n + j`` at every stage. The selected scores are
always exactly the top k of all N sums ``s1[i] + s2[j]``; the indices equal, index for index,
sorting all N sums by (score descending, index ascending) whenever rounding never makes distinct
half-scores tie in a sum (e.g. ``inf + x`` or ``1 + 1e-38``), which holds for ordinary data and
is what the brute-force tests check. The GPU kernels match this function exactly, edge cases included.
"""

import torch


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries along the last dim, best first, ties to the lower position.

    float32 (and narrower) scores: one ``topk`` over int64 keys ``(order-preserving score bits) << 32
    | (2**32 - 1 - position)``, several times faster on CPU than a stable sort. float64: stable sort.
    """
    if scores.dtype == torch.float64:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: they tie
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # int order == float order
    position = torch.arange(scores.shape[-1], device=scores.device)
    return torch.topk((bits << 32) | (0xFFFFFFFF - position), k, dim=-1).indices


def product_key_topk(q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int):
    """Exact top-k over all n*n product keys, per head.

    Args:
        q1, q2: (T, H, h) query halves.
        keys1, keys2: (H, n, h) sub-key tables of each head.
        k: keys to keep, 1 <= k <= n.

    Returns:
        scores (T, H, k), best first, differentiable in queries and keys;
        indices (T, H, k) int64 flat key ids ``i*n + j`` in [0, n*n).
    """
    n = keys1.shape[1]
    s1 = torch.einsum("thd,hnd->thn", q1, keys1)  # (T, H, n)
    s2 = torch.einsum("thd,hnd->thn", q2, keys2)
    with torch.no_grad():
        # Each half's top k in ascending sub-key id, so the row-major k x k grid is in ascending
        # flat-index order and "lower grid position" means "lower flat index" on ties.
        i_top = _top_k(s1, k).sort(dim=-1).values  # (T, H, k)
        j_top = _top_k(s2, k).sort(dim=-1).values
        grid = (s1.gather(-1, i_top).unsqueeze(-1) + s2.gather(-1, j_top).unsqueeze(-2)).flatten(-2)  # (T, H, k*k)
        best = _top_k(grid, k)  # (T, H, k) positions in the grid
        i = i_top.gather(-1, torch.div(best, k, rounding_mode="floor"))
        j = j_top.gather(-1, best % k)
    scores = s1.gather(-1, i) + s2.gather(-1, j)  # same float sums as the grid, now with autograd
    return scores, i * n + j
