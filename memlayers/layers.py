"""MemoryLayer: product-key retrieval + a value table (own or shared) + an output map."""

import torch
import torch.nn.functional as F
from torch import nn

from .config import MemoryConfig, preset
from .metrics import UsageTracker
from .retrieval import ProductKeys
from .values import ValueTable


class MemoryLayer(nn.Module):
    """A trainable sparse key-value memory, a drop-in for (or beside) a transformer FFN.

    ``y = sum_heads sum_topk w * V[index]`` over the exact top-k product keys, then
    ``W2 (y * silu(W1 x))`` when ``config.gated`` (Memory+), else a projection to ``dim`` if
    ``value_dim != dim``. Works on any input shape ``(..., dim)``.

    Args:
        config: a ``MemoryConfig`` (see ``memlayers.preset`` for the papers' defaults).
        values: an existing ``ValueTable`` to share (Memory+ pools); its size must be
            ``n_keys**2 x value_dim``. The first layer given a table registers it (it is saved
            and trained once, under that layer); later layers hold a plain reference.
    """

    def __init__(self, config: MemoryConfig, values: ValueTable | None = None):
        super().__init__()
        self.config = c = config
        self.input_dropout = nn.Dropout(c.input_dropout)
        self.retrieval = ProductKeys(
            c.dim, c.n_keys, c.heads, c.topk, c.key_dim, c.query_bias, c.query_norm, c.qk_norm, c.score_fn, c.query_dropout
        )
        if values is None:
            values = ValueTable(c.num_values, c.value_dim, sparse_grad=c.sparse_values)
        elif not isinstance(values, ValueTable):
            raise TypeError(f"MemoryLayer: values must be a memlayers.ValueTable, got {type(values).__name__}")
        elif (values.num_values, values.dim) != (c.num_values, c.value_dim):
            raise ValueError(
                f"MemoryLayer: the shared ValueTable is {values.num_values} x {values.dim} but this layer needs "
                f"n_keys**2 x value_dim = {c.num_values} x {c.value_dim}; build every layer sharing a pool "
                "with the same n_keys and value_dim"
            )
        elif values.sparse_grad != c.sparse_values:
            raise ValueError(
                f"MemoryLayer: config.sparse_values={c.sparse_values} but the shared ValueTable has "
                f"sparse_grad={values.sparse_grad}; build the table with ValueTable(..., sparse_grad={c.sparse_values})"
            )
        self.owns_values = not values.owned
        if self.owns_values:
            self.values = values
            values.owned = True
        else:
            self.__dict__["values"] = values  # a reference only: not a submodule, not in state_dict
        self.value_dropout = nn.Dropout(c.value_dropout)
        self.gate_proj = nn.Linear(c.dim, c.value_dim) if c.gated else None  # W1
        self.out_proj = nn.Linear(c.value_dim, c.dim) if c.gated or c.value_dim != c.dim else None  # W2
        self.usage = UsageTracker(c.n_keys, c.heads, window=c.usage_window) if c.track_usage else None
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, dim: int, values: ValueTable | None = None, **overrides) -> "MemoryLayer":
        """``MemoryLayer.from_preset("memory_plus", 512, n_keys=256)``: see ``memlayers.preset``."""
        return cls(preset(name, dim, **overrides), values)

    def reset_parameters(self) -> None:
        """Projections N(0, dim^-1/2) with zero biases, as the paper; keys and values reset in their modules."""
        for proj in (self.gate_proj, self.out_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
                nn.init.zeros_(proj.bias)

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        dim = self.config.dim
        if x.dim() < 1 or x.shape[-1] != dim:
            raise ValueError(f"MemoryLayer: expected input of shape (..., {dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"MemoryLayer: input must be floating point, got {x.dtype}")
        param = self.retrieval.query.weight
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"MemoryLayer: input is {x.dtype} but the layer's parameters are {param.dtype}; "
                f"call layer.to({x.dtype}), cast the input, or run under torch.autocast"
            )
        if x.device != param.device:
            raise ValueError(f"MemoryLayer: input is on {x.device} but the layer is on {param.device}; call layer.to({x.device!s:s}) or move the input")
        if self.values.weight.device != param.device:
            raise ValueError(
                f"MemoryLayer: the value table is on {self.values.weight.device} but the layer on {param.device}; "
                "a shared table moves with the layer that owns it, so move the whole model"
            )
        if mask is not None and (mask.shape != x.shape[:-1] or mask.dtype != torch.bool):
            raise ValueError(
                f"MemoryLayer: mask must be a bool tensor of shape {tuple(x.shape[:-1])} (True = real token), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )

    def retrieve(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """x (..., dim) -> indices (..., H, k) int64 slot ids, weights (..., H, k) float32 (float64 if x is)."""
        self._check_input(x, mask)
        lead = x.shape[:-1]
        weights, indices = self.retrieval(x.reshape(-1, self.config.dim), None if mask is None else mask.reshape(-1))
        shape = (*lead, self.config.heads, self.config.topk)
        return indices.view(shape), weights.view(shape)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., dim), mask (...) bool or None (padding: kept out of BatchNorm and usage stats) -> (..., dim)."""
        self._check_input(x, mask)
        lead, dim = x.shape[:-1], self.config.dim
        x = self.input_dropout(x.reshape(-1, dim))  # (T, dim)
        flat_mask = None if mask is None else mask.reshape(-1)
        weights, indices = self.retrieval(x, flat_mask)  # (T, H, k) each
        if self.usage is not None and self.training:
            self.usage.update(indices, weights, flat_mask)
        y = self.values(indices.flatten(1), weights.flatten(1))  # (T, value_dim)
        y = self.value_dropout(y.to(x.dtype))
        if self.gate_proj is not None:
            y = y * F.silu(self.gate_proj(x))
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y.reshape(*lead, dim)

    def extra_repr(self) -> str:
        if self.owns_values:
            return ""
        return f"values=shared ValueTable({self.values.num_values} x {self.values.dim}, owned by another layer)"
