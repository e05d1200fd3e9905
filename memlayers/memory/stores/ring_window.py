"""RingWindow: one layer's window onto a larger shared pool (UltraMemV2's ring sharing)."""

import torch

from ..parts import ValueStore


class RingWindow(ValueStore):
    """Reads slots ``[offset, offset + num_slots)`` of ``pool`` (wrapping around its end): slot id i of
    this layer is row ``(offset + i) % pool.num_slots``. Holds the pool by reference (the model owns it).

    pool: the shared store; offset: this layer's first row; num_slots: the layer's slot count (<= the pool's).
    """

    def __init__(self, pool: ValueStore, offset: int, num_slots: int):
        super().__init__()
        if not 0 < num_slots <= pool.num_slots:
            raise ValueError(f"RingWindow: num_slots must be in [1, pool.num_slots={pool.num_slots}], got {num_slots}")
        self.__dict__["inner"] = pool  # a reference, not a submodule
        self.offset, self.num_slots = offset % pool.num_slots, num_slots
        self.out_dim, self.sparse_grad, self.lr_decay = pool.out_dim, pool.sparse_grad, pool.lr_decay

    def root(self) -> ValueStore:
        return self.inner.root()

    def param_roles(self) -> dict:
        return {}  # the pool declares its own

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.rows((ids + self.offset) % self.inner.num_slots)

    def read_params(self, reads: int) -> int:
        return self.inner.read_params(reads)

    def read_flops(self, reads: int) -> int:
        return self.inner.read_flops(reads)

    def signature(self) -> dict:
        return {**self.inner.signature(), "num_slots": self.num_slots}

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner((ids + self.offset) % self.inner.num_slots, weights, x)

    def extra_repr(self) -> str:
        return f"offset={self.offset}, num_slots={self.num_slots} of {self.inner.num_slots}"
