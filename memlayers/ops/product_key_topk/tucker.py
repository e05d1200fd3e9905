"""UltraMem's Tucker selection (``TuckerProductKeys``) in plain PyTorch: per token and head, the top m rows and
columns by their rank-1 filter scores (``filter_scores``, from the side scores), and the bottom m of each (large
negative side scores can make large products), then the best k cells of those m x m grids under the full core
``C_sum``.

Not exact over all n*n cells (the paper's approximation); ties among filter scores or grid scores go as torch's
``topk`` breaks them. ``cpu_select.tucker_select_cpu`` computes the same function (ties to the lower position).
"""

import torch


def gather_sides(s: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """s (T, H, r, n), i (T, H, m) -> (T, H, r, m): every rank's scores at the chosen sub-keys."""
    return s.gather(3, i.unsqueeze(2).expand(-1, -1, s.shape[2], -1))


def filter_scores(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One side's rank-1 filter scores ``Σ_a w[h, a] s[t, h, a, i]``: s (T, H, r, n), w (H, r) -> (T, H, n)."""
    return (s * w.to(s.dtype)[..., None]).sum(2)


def tucker_select(
    s_row: torch.Tensor, s_col: torch.Tensor, u: torch.Tensor, v: torch.Tensor, core: torch.Tensor, m: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows and columns (T, H, k) int64 of each head's k best candidates, best first, and their side scores
    ``gather_sides(s_row, rows)``, ``gather_sides(s_col, columns)`` (T, H, r, k).

    s_row, s_col (T, H, r, n): the side scores; u, v (H, r): the filter pair (rows rank by ``u·S_row[:, i]``, columns
    by ``v·S_col[:, j]``); core (H, r, r): the cores summed; m in [k, n]: rows and columns per block. Blocks: the top m
    rows x the top m columns, and unless m = n the bottom m x the bottom m (its cells already in the top block are
    left out). A cell (p, q) scores ``Σ_b (Σ_a S_row[a, p] core[a, b]) S_col[b, q]``.
    """
    a, b = filter_scores(s_row, u), filter_scores(s_col, v)  # (T, H, n)
    n = a.shape[-1]
    blocks = (True, False) if m < n else (True,)  # top x top, and bottom x bottom
    i = torch.cat([a.topk(m, dim=-1, largest=largest).indices for largest in blocks], -1)  # (T, H, B*m)
    j = torch.cat([b.topk(m, dim=-1, largest=largest).indices for largest in blocks], -1)
    sr = gather_sides(s_row, i).unflatten(-1, (len(blocks), m))  # (T, H, r, B, m)
    sc = gather_sides(s_col, j).unflatten(-1, (len(blocks), m))
    row_core = (sr.unsqueeze(3) * core.to(sr.dtype)[..., None, None]).sum(2)  # (T, H, r, B, m); matmul: slower
    grid = torch.einsum("thbBi,thbBj->thBij", row_core, sc)  # (T, H, B, m, m)
    if len(blocks) == 2:  # a cell whose row and column are both in the top block is there already
        top_i = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, i[..., :m], True)
        top_j = torch.zeros_like(b, dtype=torch.bool).scatter_(-1, j[..., :m], True)
        seen = top_i.gather(-1, i[..., m:]).unsqueeze(-1) & top_j.gather(-1, j[..., m:]).unsqueeze(-2)
        grid[:, :, 1].masked_fill_(seen, float("-inf"))
    best = grid.flatten(2).topk(k, dim=-1).indices  # (T, H, k) in [0, B*m*m)
    block, cell = best // (m * m), best % (m * m)
    rows, columns = i.gather(-1, block * m + cell // m), j.gather(-1, block * m + cell % m)
    return rows, columns, gather_sides(s_row, rows), gather_sides(s_col, columns)
