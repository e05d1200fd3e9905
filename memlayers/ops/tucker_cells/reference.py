"""UltraMem's cell scores in plain PyTorch: each selected slot's score under every core, from its row's and column's
side scores (``TuckerProductKeys``' multi-core scoring), the gradients of that function, and the side scores'
gradients in the queries and keys."""

import torch

from ..gather_dot.library import gather_dot_backward


def cell_scores(sr: torch.Tensor, sc: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """sr, sc (T, H, r, k): the side scores of each selected slot's row and column; cores (C, H, r, r) -> scores
    (T, H, C, k), ``Σ_a Σ_b sr[a] cores[c, h, a, b] sc[b]``: each product ``sr[a] sc[b]`` rounded, times the core,
    summed over (a, b) in row-major order."""
    pair = sr.unsqueeze(3) * sc.unsqueeze(2)  # (T, H, r, r, k): sr[a] * sc[b]
    weighted = pair.unsqueeze(2) * cores.to(sr.dtype).transpose(0, 1)[None, ..., None]  # (T, H, C, r, r, k)
    return weighted.sum((3, 4))  # matmuls of inner size r² are slower


def cell_scores_backward(
    sr: torch.Tensor, sc: torch.Tensor, cores: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``cell_scores`` for grad (T, H, C, k): (d sr, d sc (T, H, r, k), d cores (C, H, r, r))."""
    cores = cores.to(sr.dtype)
    d_pair = (grad.unsqueeze(3).unsqueeze(4) * cores.transpose(0, 1)[None, ..., None]).sum(2)  # (T, H, r, r, k)
    d_sr = (d_pair * sc.unsqueeze(2)).sum(3)
    d_sc = (d_pair * sr.unsqueeze(3)).sum(2)
    d_cores = (grad.unsqueeze(3).unsqueeze(4) * (sr.unsqueeze(3) * sc.unsqueeze(2)).unsqueeze(2)).sum((0, 5))
    return d_sr, d_sc, d_cores.transpose(0, 1).contiguous()


def side_scores_backward(q, keys, i, j, g_row, g_col, impl: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients in q (T, H, Q, 2, d) and keys (H, 2, r, n, d) of the side scores at the chosen rows i and columns
    j (T, H, k), ``sr[t, h, a, k] = q[t, h, a // (r / Q), 0] · keys[h, 0, a, i[t, h, k]]`` (and ``sc`` with side 1 and
    j), for their gradients g_row, g_col (T, H, r, k): one ``gather_dot`` backward over both sides (a bag over the
    chosen keys and its value gradient; ``impl`` its dispatch), touching the chosen keys only -> (dq, dkeys)."""
    (T, H, Q), (r, n, d), k = q.shape[:3], keys.shape[2:], i.shape[2]
    rows = torch.arange(H * 2 * r, device=i.device).view(1, H, 2, r, 1) * n + torch.stack((i, j), 2).unsqueeze(3)
    g = torch.stack((g_row, g_col), 2)  # (T, H, 2, r, k), as the key rows (H*2*r*n, d) they read
    if Q > 1:  # one query per rank: the entries of query (t, h, a, side)
        rows, g = (x.view(T, H, 2, Q, r // Q, k).transpose(2, 3) for x in (rows, g))
    d_keys, d_q = gather_dot_backward(
        keys.reshape(-1, d), rows.reshape(-1, r // Q * k), q.reshape(-1, d), g.reshape(-1, r // Q * k), impl, True, True
    )
    return d_q.view(q.shape), d_keys.view(keys.shape)
