"""ProjectedInput: a layer's own input projection in front of a store that reads x (UltraMemV2)."""

import torch
from torch import nn

from ..parts import ValueStore, linear_flops


class ProjectedInput(ValueStore):
    """``inner(ids, weights, P x)``: the store sees the layer input projected to ``in_dim`` by this layer's
    own ``proj`` (no bias, N(0, dim^-1/2)). The inner store (e.g. ``PEERExperts`` tables shared by
    every block) is a submodule when ``owned``, else a reference to a pool the model owns.

    ids (T, H, k), weights (T, H, k), x (T, dim) -> (T, inner.out_dim).
    """

    def __init__(self, inner: ValueStore, dim: int, in_dim: int, owned: bool):
        super().__init__()
        if owned:
            self.inner = inner
        else:
            self.__dict__["inner"] = inner
        self.proj = nn.Linear(dim, in_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=dim**-0.5)
        self.num_slots, self.out_dim = inner.num_slots, inner.out_dim
        self.sparse_grad, self.lr_decay = inner.sparse_grad, inner.lr_decay

    def root(self) -> ValueStore:
        return self.inner.root()

    def param_roles(self) -> dict:
        return {"dense": [self.proj.weight]}  # the inner store declares its own

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.rows(ids)

    def read_params(self, reads: int) -> int:
        return self.inner.read_params(reads)

    def read_flops(self, reads: int) -> int:
        return linear_flops(self.proj) + self.inner.read_flops(reads)

    def signature(self) -> dict:
        return self.inner.signature()

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.inner(ids, weights, self.proj(x))
