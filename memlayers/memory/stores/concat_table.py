"""ConcatTable: a value table whose heads' rows are concatenated, not summed (Engram's n-gram embeddings)."""

import torch

from .value_table import ValueTable


class ConcatTable(ValueTable):
    """A (num_values, dim) table of which each token reads one row per head, side by side.

    ``forward(ids (T, heads, 1), weights (T, heads, 1), x) -> (T, heads * dim)``: head h's slice is
    ``weights[t, h, 0] * V[ids[t, h, 0]]`` (the weights are ones for hashed n-grams). One embedding bag
    of T*heads bags of one row each, so ``sparse_grad`` and the row-sparse optimizers work as for
    ``ValueTable``.

    Args: those of ``ValueTable``, and heads: rows read per token (``out_dim = heads * dim``).
    """

    def __init__(self, num_values: int, dim: int, heads: int, sparse_grad: bool = False, **kwargs):
        super().__init__(num_values, dim, sparse_grad, **kwargs)
        if heads < 1:
            raise ValueError(f"ConcatTable: heads must be >= 1, got {heads}")
        self.heads = heads
        self.out_dim = heads * dim

    def read_flops(self, reads: int) -> int:
        """A gather: no multiply-adds (the unit weights' products are not counted)."""
        return 0

    def signature(self) -> dict:
        return {**super().signature(), "heads": self.heads}

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 3 or ids.shape[1:] != (self.heads, 1) or weights.shape != ids.shape:
            raise ValueError(
                f"ConcatTable: expected ids and weights of shape (T, {self.heads}, 1), "
                f"got {tuple(ids.shape)} and {tuple(weights.shape)}"
            )
        T = ids.shape[0]
        rows = self.bag(ids.reshape(T * self.heads, 1), weights.reshape(T * self.heads, 1))
        return rows.view(T, self.out_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}"
