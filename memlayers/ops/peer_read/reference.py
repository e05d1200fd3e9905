"""PEER's read in plain PyTorch: ``y[t] = Σ_l w[t, l] act(u[ids[t, l]] · x[t]) v[ids[t, l]]``, and its gradients, each
from the embedding bag's reference functions (per-entry dots, bags, value gradients): never a (T, L, d) gather."""

import torch
import torch.nn.functional as F

from ..embedding_bag.reference import bag_forward, value_grad, weight_grad

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "identity": lambda h: h}
FUSED_ACTIVATIONS = ("identity", "relu")  # what the CPU kernel fuses (``cpu_peer.py``)


def activation_backward(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(h), by torch's own backward formulas (the floats autograd makes)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if activation == "relu":
        return torch.where(h <= 0, 0.0, grad)  # a NaN h passes the gradient, as autograd's threshold_backward
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    return grad


def peer_read(u, v, ids, weights, x, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """u (N, d_in), v (N, d_out), ids (T, L) int64, weights (T, L), x (T, d_in) -> (y (T, d_out) in v's dtype, the
    pre-activations h = u[ids] · x (T, L) float32, float64 if an input is)."""
    h = weight_grad(u, ids, x)
    return bag_forward(v, ids, weights * ACTIVATIONS[activation](h)), h


def peer_read_backward(u, v, ids, weights, x, h, grad, activation: str):
    """The gradients of ``peer_read`` for grad (T, d_out), given its h: (d u, d v, d weights, d x)."""
    a = ACTIVATIONS[activation](h)
    d_gates = weight_grad(v, ids, grad)  # (T, L)
    d_v = value_grad(ids, weights * a, grad, v.shape[0])
    d_h = activation_backward(d_gates * weights, h, activation)
    return value_grad(ids, d_h, x, u.shape[0]), d_v, d_gates * a, bag_forward(u, ids, d_h)
