"""ValueTable: the N x d_v rows a memory reads as a weighted bag, alone or as a pool shared by layers."""

import torch
from torch import nn

from ...ops import embedding_bag
from ..parts import ValueStore


class ValueTable(ValueStore):
    """A trainable (num_values, dim) table read as a weighted embedding bag.

    ``forward(ids (T, H, k), weights (T, H, k), x) -> (T, dim)``: ``sum_{h,k} weights * V[ids]``; with
    weights (T, H, k, C) ("multi-core" scores, C dividing dim) column slice c of every row is weighted
    by ``weights[..., c]``.

    One table can be read by several ``MemoryLayer``s (a Memory+ *shared pool*): the model owns it
    (``Transformer.pools``), the layers hold a reference. Nothing is global: two models built in one
    process never share a table unless you pass them the same object.

    Args:
        num_values: N, the number of rows.
        dim: d_v, the width of a row.
        sparse_grad: give ``weight`` row-sparse COO gradients (only touched rows), for
            ``memlayers.optim.SparseRowAdam`` (``build_optimizer(value_optimizer="sparse_adam")``) or
            ``torch.optim.SparseAdam``.
        dtype, device: of the table.
        init_std: N(0, init_std) init; None: dim^-1/2, as in the paper.
        lr_decay: see ``ValueStore``.
    """

    def __init__(
        self,
        num_values: int,
        dim: int,
        sparse_grad: bool = False,
        dtype=None,
        device=None,
        init_std: float | None = None,
        lr_decay: tuple[float, float] | None = None,
    ):
        super().__init__()
        if num_values < 1:
            raise ValueError(f"ValueTable: num_values must be >= 1, got {num_values}")
        if dim < 1:
            raise ValueError(f"ValueTable: dim must be >= 1, got {dim}")
        self.num_values = self.num_slots = num_values
        self.dim = self.out_dim = dim
        self.sparse_grad = sparse_grad
        self.init_std = init_std
        self.lr_decay = lr_decay
        self.weight = nn.Parameter(torch.empty(num_values, dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.dim**-0.5 if self.init_std is None else self.init_std)

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"values": [self.weight]}

    def read_params(self, reads: int) -> int:
        return reads * self.dim

    def read_flops(self, reads: int) -> int:
        """The weighted bag: one multiply-add per entry of each row read, 2 * reads * d_v."""
        return 2 * reads * self.dim

    def bag(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids (T, L) in [0, N), weights (T, L) -> (T, dim): the plain weighted bag."""
        return embedding_bag(self.weight, ids, weights, sparse_grad=self.sparse_grad)

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if weights.dim() == ids.dim():
            return self.bag(ids.flatten(1), weights.flatten(1))
        return multi_core_bag(self.weight, ids, weights, self.sparse_grad)

    def extra_repr(self) -> str:
        return f"num_values={self.num_values}, dim={self.dim}, sparse_grad={self.sparse_grad}"


class RowSlices(torch.autograd.Function):
    """table (N, d) -> the (N*C, d/C) view whose row r*C + c is column slice c of row r. Autograd's own view
    cannot take a row-sparse gradient back (sparse reshape); this backward maps it to (N, d) row-sparse."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, C: int) -> torch.Tensor:
        ctx.shape, ctx.C = table.shape, C
        return table.view(table.shape[0] * C, table.shape[1] // C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (N, d), C = ctx.shape, ctx.C
        if not grad.is_sparse:
            return grad.reshape(N, d), None
        grad = grad.coalesce()
        slices = grad.indices()[0]
        rows, at = torch.unique(slices // C, return_inverse=True)
        values = grad.values().new_zeros(rows.numel(), C, d // C)
        values[at, slices % C] = grad.values()
        grad = torch.sparse_coo_tensor(
            rows.unsqueeze(0), values.view(-1, d), (N, d), is_coalesced=True, check_invariants=False
        )
        return grad, None


def multi_core_bag(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, sparse_grad: bool = False):
    """table (N, d), ids (T, H, k), weights (T, H, k, C) with C | d -> (T, d): column slice c of each row
    weighted by weights[..., c]. One bag over the table seen as (N*C, d/C) rows: slice c of row i is row
    i*C + c, and token t's slice c is bag t*C + c."""
    T, C = ids.shape[0], weights.shape[-1]
    N, d = table.shape
    if d % C:
        raise ValueError(
            f"multi-core weights: {C} cores must divide the row width {d}; use a value width divisible by C"
        )
    L = ids[0].numel()
    rows = (ids.reshape(T, 1, L) * C + torch.arange(C, device=ids.device).view(1, C, 1)).reshape(T * C, L)
    w = weights.reshape(T, L, C).transpose(1, 2).reshape(T * C, L)
    return embedding_bag(RowSlices.apply(table, C), rows, w, sparse_grad=sparse_grad).view(T, d)
