"""Plain, projected and gated (Memory+) readouts."""

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Readout, linear_flops


class ProjectedReadout(Readout):
    """y (T, value_dim), x (T, dim) -> (T, dim):

    * plain: ``y`` itself (value_dim == dim, not gated);
    * projected: ``W2 y`` (value_dim != dim);
    * gated (Memory+'s swilu output): ``W2 (y * silu(W1 x))``.

    Projections N(0, in_features^-1/2) with zero biases, as the paper.
    """

    def __init__(self, dim: int, value_dim: int, gated: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, value_dim) if gated else None  # W1
        self.out_proj = nn.Linear(value_dim, dim) if gated or value_dim != dim else None  # W2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.gate_proj, self.out_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
                nn.init.zeros_(proj.bias)

    def flops_per_token(self) -> int:
        return linear_flops(self.gate_proj, self.out_proj)

    def forward(self, y: torch.Tensor, x: torch.Tensor, lead=None, state=None, mask=None) -> torch.Tensor:
        if self.gate_proj is not None:
            y = y * F.silu(self.gate_proj(x))
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y
