"""PEERExperts: N single-neuron experts ``e_i(x) = act(u_i · x) v_i`` (He 2024, "Mixture of A Million Experts")."""

import torch
from torch import nn

from ...ops.peer_read import ACTIVATIONS, peer_read
from .servable import ServableStore


class PEERExperts(ServableStore):
    """Two (N, ·) row tables ``u`` (N, in_dim) and ``v`` (N, out_dim): expert i is ``act(u_i · x) v_i``.

    ``forward(ids (T, H, k), weights (T, H, k), x (T, in_dim)) -> (T, out_dim)``:
    ``sum_{h, k} weights * act(u[ids] · x) * v[ids]`` (``memlayers.ops.peer_read``: a gathered dot, T x H*k
    pre-activations in float32, then a weighted bag over ``v`` with weights ``weights * act(·)``): never a
    (T, H*k, d) tensor.

    Both tables are "values": large tables a token reads a few rows of (value lr, no weight decay,
    row-sparse gradients and optimizers with ``sparse_grad``). Like ``ValueTable`` it can be a pool
    several layers share (the model owns it, layers hold a reference).

    Args:
        num_experts: N, the rows of both tables.
        in_dim: width of x and of u's rows (the layer's dim).
        out_dim: width of v's rows and of the output.
        activation: "gelu" | "relu" | "silu" | "identity".
        sparse_grad: row-sparse COO gradients for u and v (touched rows only).
        init_std: std of v's N(0, init_std) init; None: out_dim^-1/2 (as ``ValueTable``). u is always
            N(0, in_dim^-1/2), so u_i · x is O(1) for unit-RMS x (PEER-pytorch keeps nn.Embedding's
            N(0, 1) for both, which puts u_i · x at O(sqrt(in_dim)), deep in the activation's tails).
        lr_decay: see ``ValueStore``.
    """

    served_tables = ("u", "v")

    def __init__(
        self,
        num_experts: int,
        in_dim: int,
        out_dim: int,
        activation: str = "gelu",
        sparse_grad: bool = False,
        init_std: float | None = None,
        lr_decay: tuple[float, float] | None = None,
    ):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("in_dim", in_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"PEERExperts: {name} must be >= 1, got {value}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"PEERExperts: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.num_experts = self.num_slots = num_experts
        self.in_dim, self.out_dim = in_dim, out_dim
        self.activation = activation
        self.sparse_grad = sparse_grad
        self.init_std = init_std
        self.lr_decay = lr_decay
        self.u = nn.Parameter(torch.empty(num_experts, in_dim))
        self.v = nn.Parameter(torch.empty(num_experts, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.u, std=self.in_dim**-0.5)
        nn.init.normal_(self.v, std=self.out_dim**-0.5 if self.init_std is None else self.init_std)

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"values": self.value_tables()}

    def read_params(self, reads: int) -> int:
        return reads * (self.in_dim + self.out_dim)

    def read_flops(self, reads: int) -> int:
        """The dots u_j · x, 2 * reads * in_dim, and the weighted bag over v, 2 * reads * out_dim. The
        activation and the gate product g_j * act(·) are not counted (as activations and norms, by
        ``memlayers.accounting``'s conventions)."""
        return 2 * reads * self.in_dim + 2 * reads * self.out_dim

    def signature(self) -> dict:
        return {**super().signature(), "in_dim": self.in_dim, "activation": self.activation}

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if weights.shape != ids.shape:
            raise ValueError(
                f"PEERExperts: weights must have the ids' shape {tuple(ids.shape)} (one gate per expert), "
                f"got {tuple(weights.shape)}"
            )
        ids = ids.flatten(1)  # (T, H*k)
        if self.served:  # quantised or offloaded: the distinct experts read, dequantised, on ids' device
            (tables, ids), sparse = self.served_rows(ids), False
            u, v = tables["u"], tables["v"]
        else:
            u, v, sparse = self.u, self.v, self.sparse_grad
        return peer_read(u, v, ids, weights.flatten(1), x, self.activation, sparse)  # (T, out_dim) in v's dtype

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_dim={self.in_dim}, out_dim={self.out_dim}, "
            f"activation={self.activation!r}, sparse_grad={self.sparse_grad}{self.served_repr()}"
        )
