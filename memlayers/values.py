"""Value tables: the N x d_v rows a memory reads, alone or shared by several layers."""

import torch
from torch import nn

from .ops import embedding_bag


class ValueTable(nn.Module):
    """A trainable (num_values, dim) table read as a weighted embedding bag.

    One table can be passed to several ``MemoryLayer``s (a Memory+ *shared pool*). The first
    layer that receives it registers it as a submodule, so it is trained, moved and saved once,
    under that layer's name; the others keep a plain reference. Nothing is global: two models
    built in one process never share a table unless you pass them the same object.

    Args:
        num_values: N, the number of rows.
        dim: d_v, the width of a row.
        sparse_grad: give ``weight`` row-sparse COO gradients (only touched rows), for
            ``memlayers.optim.SparseRowAdam`` (``build_optimizer(value_optimizer="sparse_adam")``) or ``torch.optim.SparseAdam``.
        dtype, device: of the table; init is N(0, dim^-1/2) as in the paper.
    """

    def __init__(self, num_values: int, dim: int, sparse_grad: bool = False, dtype=None, device=None):
        super().__init__()
        if num_values < 1:
            raise ValueError(f"ValueTable: num_values must be >= 1, got {num_values}")
        if dim < 1:
            raise ValueError(f"ValueTable: dim must be >= 1, got {dim}")
        self.num_values = num_values
        self.dim = dim
        self.sparse_grad = sparse_grad
        self.weight = nn.Parameter(torch.empty(num_values, dim, dtype=dtype, device=device))
        self.owned = False  # set by the first layer that registers this table
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.dim**-0.5)

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices (T, L) in [0, N), weights (T, L) -> (T, dim)."""
        return embedding_bag(self.weight, indices, weights, sparse_grad=self.sparse_grad)

    def extra_repr(self) -> str:
        return f"num_values={self.num_values}, dim={self.dim}, sparse_grad={self.sparse_grad}"
