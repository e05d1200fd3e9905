"""UltraMem's cell scores in plain PyTorch: each selected slot's score under every core, from its row's and column's
side scores (``TuckerProductKeys``' multi-core scoring), and the gradients of that function."""

import torch


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
