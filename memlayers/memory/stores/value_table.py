"""ValueTable: the N x d_v rows a memory reads as a weighted bag, alone or as a pool shared by layers."""

import torch
from torch import nn

from ...ops import embedding_bag
from .servable import ServableStore


class ValueTable(ServableStore):
    """A trainable (num_values, dim) table read as a weighted embedding bag.

    ``forward(ids (T, H, k), weights (T, H, k), x) -> (T, dim)``: ``sum_{h,k} weights * V[ids]``.

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
        self.value_grad_sink = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.dim**-0.5 if self.init_std is None else self.init_std)

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"values": self.value_tables()}

    def read_params(self, reads: int) -> int:
        return reads * self.dim

    def read_flops(self, reads: int) -> int:
        """The weighted bag: one multiply-add per entry of each row read, 2 * reads * d_v."""
        return 2 * reads * self.dim

    def set_value_grad_sink(self, param: nn.Parameter, sink) -> None:
        if param is not self.weight:
            raise ValueError(f"{type(self).__name__}.set_value_grad_sink: the parameter is not this table's weight")
        if self.value_grad_sink is not None:
            self.value_grad_sink.close()
        self.value_grad_sink = sink

    def bag(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids (T, L) in [0, N), weights (T, L) -> (T, dim): the plain weighted bag."""
        if self.served:  # quantised or offloaded: the distinct rows read, dequantised, on ids' device
            tables, ids = self.served_rows(ids)
            return embedding_bag(tables["weight"], ids, weights)
        return embedding_bag(
            self.weight, ids, weights, sparse_grad=self.sparse_grad, value_grad_sink=self.value_grad_sink
        )

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.bag(ids.flatten(1), weights.flatten(1))

    def extra_repr(self) -> str:
        return f"num_values={self.num_values}, dim={self.dim}, sparse_grad={self.sparse_grad}{self.served_repr()}"
