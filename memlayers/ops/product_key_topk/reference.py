"""Exact product-key top-k in plain PyTorch.

Per head, the N = n*n full keys are the concatenations ``[K1[i], K2[j]]``, with score
``s1[i] + s2[j]`` where ``s1 = K1 q1`` and ``s2 = K2 q2``. The best k full keys always lie in
the k x k grid of each half's own top k, so only ``2n + k*k`` scores are ever formed.

Ties are broken by the smaller flat index ``i*n + j`` at every stage (stable sorts), which makes
the result equal, index for index, to sorting all N scores ``s1[i] + s2[j]`` by
(score descending, index ascending) and taking the first k. The GPU kernels must match that.
"""

import torch


def _top_k_lowest_index_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries along the last dim, ties to the lower position, best first."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


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
        # Each half's top k, re-sorted by sub-key id so that the row-major k x k grid is in
        # ascending flat-index order; a stable sort of the grid then breaks ties by flat index.
        i_top = _top_k_lowest_index_first(s1, k).sort(dim=-1).values  # (T, H, k)
        j_top = _top_k_lowest_index_first(s2, k).sort(dim=-1).values
        grid = s1.gather(-1, i_top).unsqueeze(-1) + s2.gather(-1, j_top).unsqueeze(-2)  # (T, H, k, k)
        best = _top_k_lowest_index_first(grid.flatten(-2), k)  # (T, H, k) positions in the grid
        i = i_top.gather(-1, torch.div(best, k, rounding_mode="floor"))
        j = j_top.gather(-1, best % k)
    scores = s1.gather(-1, i) + s2.gather(-1, j)  # same float sums as the grid, now with autograd
    return scores, i * n + j
