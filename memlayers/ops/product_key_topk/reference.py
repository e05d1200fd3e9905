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


def _order_keys(scores: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort like (score descending, tie ascending): ``(order-preserving score bits) << 32 |
    (2**32 - 1 - tie)``. -0.0 and +0.0 tie; NaNs rank by their float32 bits (above +inf if positive, below
    -inf if negative; a float16 NaN's sign is what torch's conversion leaves of it, which can depend on the
    tensor's size). scores float32 or narrower, tie int64 in [0, 2**32), broadcastable to scores."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: they tie
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # int order == float order
    return (bits << 32) | (0xFFFFFFFF - tie)


def _top_k(scores: torch.Tensor, k: int, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest entries along the last dim, best first; ties go to the smaller
    ``tie`` value (same shape as ``scores``, int64 in [0, 2**32)), by default the lower position."""
    return _top_k_values(scores, k, tie)[0]


def _top_k_values(scores: torch.Tensor, k: int, tie: torch.Tensor | None = None):
    """``_top_k``'s positions (..., k) and the scores at them (..., k).

    float32 (and narrower) scores are ranked as by ``_order_keys``: torch's float ``topk`` finds the
    largest values in order but breaks ties arbitrarily, so a row where that matters (a tie among the k
    kept or with the best one left out, or a NaN) is redone with ``topk`` of its keys. On CPU that is
    2-3x faster than keys for every score or a stable sort (8,192 rows of 128, k = 16); other devices take
    keys for every score (the check would sync with the host).
    float64: stable sorts.
    """
    n = scores.shape[-1]
    if scores.dtype == torch.float64:
        if tie is None:
            pos = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        else:
            by_tie = tie.argsort(dim=-1, stable=True)
            best = torch.sort(scores.gather(-1, by_tie), dim=-1, descending=True, stable=True).indices[..., :k]
            pos = by_tie.gather(-1, best)
        return pos, scores.gather(-1, pos)
    if tie is None:
        tie = torch.arange(n, device=scores.device).expand(scores.shape)
    if scores.device.type != "cpu":  # keys for every score: the shortcut below reads a flag on the host
        pos = torch.topk(_order_keys(scores, tie), k, dim=-1).indices
        return pos, scores.gather(-1, pos)
    values, pos = torch.topk(scores, min(k + 1, n), dim=-1)
    # exact when these k (+ 1) values strictly decrease: no tie among the kept or with the best left out, no
    # NaN (it ranks first in topk and compares false; topk drops its sign and payload): else the row is redone
    redo = ~(values[..., 1:] < values[..., :-1]).all(dim=-1)
    values, pos = values[..., :k], pos[..., :k]
    if redo.any():  # rare with real-valued scores
        rows = scores[redo]
        pos[redo] = torch.topk(_order_keys(rows, tie[redo]), k, dim=-1).indices
        values[redo] = rows.gather(-1, pos[redo])
    return pos, values


def grid_candidates(k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (a, b) of the grid cells that can be among the top k: those with (a + 1)(b + 1) <= k.

    With both halves in rank order (score descending, ties to the lower id), every cell (a', b') with
    a' <= a and b' <= b ranks ahead of (a, b): its sum is no smaller (rounding is monotone) and, if
    equal, its halves tie with a, b and have lower ids, so its flat id is lower (unless rounding made
    sums of distinct halves equal: see the module docstring). A cell in the top k thus has
    (a + 1)(b + 1) - 1 cells ahead of it. There are sum_r floor(k / r) <= k (1 + ln k) such
    cells (119 instead of 1,024 for k = 32). Returns a, b (C,) int64, row by row.
    """
    cells = torch.tensor([(a, b) for a in range(k) for b in range(k // (a + 1))], dtype=torch.long, device=device)
    return cells[:, 0], cells[:, 1]


def product_key_select(s1: torch.Tensor, s2: torch.Tensor, k: int) -> torch.Tensor:
    """The exact selection: sub-key scores s1, s2 (T, H, n) -> flat ids ``i*n + j`` (T, H, k) int64 of the k
    best sums ``s1[i] + s2[j]``, best first, ties to the lower id."""
    n = s1.shape[-1]
    with torch.no_grad():
        # each half's top k in rank order (score descending, ties to the lower id): ids and scores (T, H, k)
        (i, v1), (j, v2) = _top_k_values(s1, k), _top_k_values(s2, k)
        a, b = grid_candidates(k, s1.device)
        cells = (*s1.shape[:2], len(a))  # (T, H, C): the cells of the k x k grid that can win

        def at(x, ranks):  # (a gather: index_select is slow for int64 on CPU)
            return x.reshape(-1, k).gather(1, ranks.expand(x.numel() // k, -1)).view(cells)

        ids = at(i, a) * n + at(j, b)
        best = _top_k(at(v1, a) + at(v2, b), k, tie=ids)  # (T, H, k)
        return ids.gather(-1, best)


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int, select=product_key_select
):
    """Exact top-k over all n*n product keys, per head.

    Args:
        q1, q2: (T, H, h) query halves.
        keys1, keys2: (H, n, h) sub-key tables of each head.
        k: keys to keep, 1 <= k <= n.
        select: ``product_key_select`` or a function computing the same (the dispatcher passes its
            ``torch.library`` op, which ``torch.compile`` sees as one node).

    Returns:
        scores (T, H, k), best first, differentiable in queries and keys;
        indices (T, H, k) int64 flat key ids ``i*n + j`` in [0, n*n).
    """
    n = keys1.shape[1]
    s1 = torch.einsum("thd,hnd->thn", q1, keys1)  # (T, H, n)
    s2 = torch.einsum("thd,hnd->thn", q2, keys2)
    ids = select(s1.detach(), s2.detach(), k)
    i = torch.div(ids, n, rounding_mode="floor")
    scores = s1.gather(-1, i) + s2.gather(-1, ids - i * n)  # the same float sums, now with autograd
    return scores, ids
