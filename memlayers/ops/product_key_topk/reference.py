"""Exact product-key top-k in plain PyTorch.

Per head, the N = n*n full keys are the concatenations ``[K1[i], K2[j]]``, with score
``s1[i] + s2[j]`` where ``s1 = K1 q1`` and ``s2 = K2 q2``. The best k full keys always lie in
the k x k grid of each half's own top k, and within it in the cells of ranks (a, b) with
(a + 1)(b + 1) <= k (``grid_candidates``), so only ``2n + ~k (1 + ln k)`` sums are ever formed.

Ties are broken by the smaller flat index ``i*n + j`` at every stage. The selected scores are
always exactly the top k of all N sums ``s1[i] + s2[j]`` (NaN sums, from inf - inf, aside); the
indices equal, index for index,
sorting all N sums by (score descending, index ascending) whenever rounding never makes distinct
half-scores tie in a sum (e.g. ``inf + x`` or ``1 + 1e-38``), which holds for ordinary fp32 data
and is what the brute-force tests check. bfloat16 scores are the exception in practice: their sums
often round to equal values, and then the scores are still exactly the top k but the ids of tied
sums may differ from a brute-force sort (e.g. 32 of 2,048 rows at n = 64, k = 8 on random data). The GPU kernels match this function exactly, edge cases included.
"""

import torch


def _top_k(scores: torch.Tensor, k: int, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest entries along the last dim, best first; ties go to the smaller
    ``tie`` value (same shape as ``scores``, int64 in [0, 2**32)), by default the lower position.

    float32 (and narrower) scores: one ``topk`` over int64 keys ``(order-preserving score bits) << 32
    | (2**32 - 1 - tie)``, several times faster on CPU than a stable sort. float64: stable sorts.
    """
    if scores.dtype == torch.float64:
        if tie is None:
            return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        by_tie = tie.argsort(dim=-1, stable=True)
        best = torch.sort(scores.gather(-1, by_tie), dim=-1, descending=True, stable=True).indices[..., :k]
        return by_tie.gather(-1, best)
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: they tie
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # int order == float order
    if tie is None:
        tie = torch.arange(scores.shape[-1], device=scores.device)
    return torch.topk((bits << 32) | (0xFFFFFFFF - tie), k, dim=-1).indices


def grid_candidates(k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (a, b) of the grid cells that can be among the top k: those with (a + 1)(b + 1) <= k.

    With both halves in rank order (score descending, ties to the lower id), every cell (a', b') with
    a' <= a and b' <= b ranks ahead of (a, b): its sum is no smaller (rounding is monotone) and, if
    equal, its halves tie with a, b and have lower ids, so its flat id is lower (unless rounding made
    sums of distinct halves equal: see the module docstring). A cell in the top k thus has
    (a + 1)(b + 1) - 1 cells ahead of it. There are sum_r floor(k / r) <= k (1 + ln k) such
    cells (119 instead of 1,024 for k = 32). Returns a, b (C,) int64, row by row.
    """
    widths = [k // r for r in range(1, k + 1)]
    a = torch.repeat_interleave(torch.arange(k), torch.tensor(widths))
    b = torch.cat([torch.arange(w) for w in widths])
    return a.to(device), b.to(device)


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
        i_top = _top_k(s1, k)  # (T, H, k) sub-key ids in rank order (score descending, ties to the lower id)
        j_top = _top_k(s2, k)
        a, b = grid_candidates(k, s1.device)
        i, j = i_top[..., a], j_top[..., b]  # (T, H, C): the cells of the k x k grid that can win
        best = _top_k(s1.gather(-1, i) + s2.gather(-1, j), k, tie=i * n + j)  # (T, H, k)
        i, j = i.gather(-1, best), j.gather(-1, best)
    scores = s1.gather(-1, i) + s2.gather(-1, j)  # the same float sums, now with autograd
    return scores, i * n + j
