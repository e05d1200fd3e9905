"""Engram's context-aware gate and short causal convolution (DeepSeek, arXiv 2601.07372)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Readout, linear_flops

SQRT_EPS = 1e-6  # inside signed_sqrt's root: its gradient at 0 is finite (at most 1 / (2 sqrt(eps)))


def rms_norm(norm: nn.RMSNorm, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``norm(t)`` computed in ``dtype`` (gain cast too: a bf16 input with an fp32 gain misses the fused kernel)."""
    return F.rms_norm(t.to(dtype), norm.normalized_shape, norm.weight.to(dtype), norm.eps)


def signed_sqrt(z: torch.Tensor, eps: float = SQRT_EPS) -> torch.Tensor:
    """``sign(z) * sqrt(|z| + eps)`` (0 at z = 0)."""
    return z.sign() * (z.abs() + eps).sqrt()


class EngramReadout(Readout):
    """e (T, in_dim), the concatenated n-gram rows, and x (T, dim), the hidden state -> (T, dim):

    ``g = sigmoid(signed_sqrt(<RMSNorm(W_k e), RMSNorm(x)> / sqrt(dim)))`` (one gate per token),
    ``v = g * W_v e``, output ``v + ShortConv(v)`` with
    ``ShortConv(v) = silu(CausalDepthwiseConv1d(RMSNorm(v)))`` along each sequence (kernel ``conv_kernel``,
    dilation ``dilation``, no bias; the RMSNorm before the conv as in the paper's released code); without
    ``short_conv`` the output is v.

    The sequences are the input's leading shape ``lead`` (..., S): each of its prod(lead[:-1]) rows is one
    sequence. With ``state`` (decoding) the conv's last (kernel - 1) * dilation inputs of each sequence are
    kept, so feeding a sequence in pieces gives the output of one call on the whole of it. Padding (``mask``
    False) enters the conv as zeros, like the positions before a sequence's start: a left-padded sequence's
    real tokens get the output they get unpadded.

    W_k, W_v: Linear(in_dim, dim) with bias, weights N(0, in_dim^-1/2), zero biases; RMSNorms with gains.
    """

    def __init__(self, dim: int, in_dim: int, short_conv: bool = True, conv_kernel: int = 4, dilation: int = 1):
        super().__init__()
        self.dim = dim
        self.key_proj = nn.Linear(in_dim, dim)  # W_k
        self.value_proj = nn.Linear(in_dim, dim)  # W_v
        self.key_norm = nn.RMSNorm(dim, eps=1e-6)
        self.query_norm = nn.RMSNorm(dim, eps=1e-6)
        self.conv_norm = nn.RMSNorm(dim, eps=1e-6) if short_conv else None
        self.conv = nn.Conv1d(dim, dim, conv_kernel, dilation=dilation, groups=dim, bias=False) if short_conv else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.key_proj, self.value_proj):
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
            nn.init.zeros_(proj.bias)
        for norm in (self.key_norm, self.query_norm, self.conv_norm):
            if norm is not None:
                norm.reset_parameters()
        if self.conv is not None:
            self.conv.reset_parameters()

    def flops_per_token(self) -> int:
        """W_k and W_v (2 * in * out each), the gate's dot product 2 * dim, the conv 2 * kernel * dim."""
        conv = 0 if self.conv is None else 2 * self.conv.kernel_size[0] * self.dim
        return linear_flops(self.key_proj, self.value_proj) + 2 * self.dim + conv

    def gate(self, e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """e (T, in_dim), x (T, dim) -> g (T, 1), computed in float32 (float64 for float64 inputs)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        k = rms_norm(self.key_norm, self.key_proj(e), acc)
        q = rms_norm(self.query_norm, x, acc)
        return torch.sigmoid(signed_sqrt((k * q).sum(-1, keepdim=True) / math.sqrt(self.dim)))

    def short_conv(
        self, v: torch.Tensor, lead: tuple[int, ...], state: dict | None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """v (T, dim) -> (T, dim): silu(causal depthwise conv of RMSNorm(v)) along each sequence of ``lead``;
        mask (T,) bool or None: padding enters the conv as zeros."""
        seq = lead[-1] if len(lead) else 1
        rows = math.prod(lead[:-1]) if len(lead) else 1
        back = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0]
        acc = torch.promote_types(v.dtype, torch.float32)
        u = rms_norm(self.conv_norm, v, acc).to(v.dtype)
        if mask is not None:
            u = u.masked_fill(~mask.unsqueeze(-1), 0.0)  # (not a product: padding's values may be non-finite)
        u = u.view(rows, seq, self.dim).transpose(1, 2)  # (rows, dim, seq)
        history = None if state is None else state.get("conv_history")
        if history is None:
            history = u.new_zeros(rows, self.dim, back)  # zero padding before the sequence's start
        elif history.shape[0] != rows:
            raise ValueError(f"EngramReadout: decoding state holds {history.shape[0]} sequences, the input {rows}")
        u = torch.cat((history.to(u.dtype), u), 2)  # (rows, dim, back + seq)
        if state is not None:
            state["conv_history"] = u[:, :, seq:].detach()
        if seq == 0:
            return torch.zeros_like(v)
        out = F.silu(self.conv(u))  # (rows, dim, seq)
        return out.transpose(1, 2).reshape(rows * seq, self.dim)

    def forward(
        self, y: torch.Tensor, x: torch.Tensor, lead=None, state: dict | None = None, mask=None
    ) -> torch.Tensor:
        lead = tuple(x.shape[:1]) if lead is None else tuple(lead)
        v = self.gate(y, x).to(x.dtype) * self.value_proj(y)
        return v if self.conv is None else v + self.short_conv(v, lead, state, mask)
