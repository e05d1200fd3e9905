"""PEER's read (``memlayers.memory.stores.PEERExperts``): ``peer_read(u, v, ids, weights, x, activation)`` =
``Σ_l weights[t, l] act(u[ids[t, l]] · x[t]) v[ids[t, l]]`` (T, d_out), differentiable in u, v, weights and x.

Float32 CPU tensors with dense gradients and an activation the kernel fuses ("identity", "relu") run the numba kernels
(``cpu_peer.py``) in one autograd function, outside ``torch.compile``; everything else (CUDA, other dtypes or
activations, row-sparse table gradients, traced graphs, ``impl="reference"``) the composition of ``gather_dot`` and
``embedding_bag``, each a custom op on its own dispatch (Triton on CUDA). ``reference.py`` computes the same function
in plain PyTorch.
"""

import torch
from torch.autograd.function import once_differentiable

from ..dispatch import cpu_kernels, use_cpu_kernel
from ..embedding_bag import embedding_bag
from ..gather_dot import gather_dot
from .reference import ACTIVATIONS, FUSED_ACTIVATIONS

__all__ = ["ACTIVATIONS", "peer_read"]


def peer_read(
    u: torch.Tensor,
    v: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    x: torch.Tensor,
    activation: str = "gelu",
    sparse_grad: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """u (N, d_in), v (N, d_out), ids (T, L) int64/int32, weights (T, L), x (T, d_in) -> (T, d_out) in v's dtype.

    sparse_grad: row-sparse COO gradients for u and v. impl: "auto" (the numba kernels where they apply, see the
    module docstring; at least ``dispatch.CPU_KERNEL_MIN_ELEMENTS`` entries) or "reference"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"peer_read: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"peer_read: ids must be int64 or int32, got {ids.dtype}")
    fused = activation in FUSED_ACTIVATIONS and not sparse_grad and not torch.compiler.is_compiling()
    if fused and use_cpu_kernel(impl, weights, u, v, x) and (kernels := cpu_kernels("peer_read.cpu_peer")):
        return _FusedRead.apply(u, v, ids.long(), weights, x, activation, kernels)
    h = gather_dot(u, ids, x, sparse_grad, impl=impl)  # (T, L) float32 (float64 for float64)
    return embedding_bag(v, ids, weights * ACTIVATIONS[activation](h), sparse_grad=sparse_grad, impl=impl)


class _FusedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, v, ids, weights, x, activation, kernels):
        y, h = kernels.peer_read_cpu(u, v, ids, weights, x, activation)
        ctx.save_for_backward(u, v, ids, weights, x, h)
        ctx.activation, ctx.kernels = activation, kernels
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        u, v, ids, weights, x, h = ctx.saved_tensors
        d_u, d_v, d_w, d_x = ctx.kernels.peer_read_backward_cpu(u, v, ids, weights, x, h, grad, ctx.activation)
        return d_u, d_v, None, d_w, d_x, None, None
