"""Query normalisations for retrieval, including a BatchNorm that respects padding."""

import torch
import torch.nn.functional as F
from torch import nn

QUERY_NORMS = ("none", "layernorm", "rmsnorm", "batchnorm")


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the feature dim whose batch statistics skip padded tokens.

    Training: normalise with the mean/variance of the real tokens (``mask`` True) and update the
    running statistics from them; an empty or fully padded batch leaves them unchanged.
    Eval: normalise with the running statistics, so a token's output never depends on its batch.
    Runs without host syncs. Statistics are computed in float32 (float64 for float64 input) and the
    running statistics stored in their own dtype, so the module trains after ``.to(torch.bfloat16)``.
    Without a mask, on input in the accumulation dtype, it is ``F.batch_norm``. With ``sync_group`` (a
    process group, set by ``memlayers.distributed.parallelize``) the training statistics are those of the
    group's tokens together (differentiable all-reduces: the gradients are those of one process holding
    every token), and every rank of the group must call forward.

    x (T, C), mask (T,) bool or None -> (T, C)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.sync_group = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 (fp64 for fp64 input)
        sync = self.sync_group is not None and self.training
        if (
            mask is None
            and not sync
            and x.dtype == acc == self.running_mean.dtype
            and (x.shape[0] > 1 or not self.training)
        ):
            # no padding: torch's fused batch norm is this function (up to rounding), several times faster on CPU
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
            )
        if not self.training or (x.shape[0] == 0 and not sync):
            mean, var = self.running_mean.to(acc), self.running_var.to(acc)
        else:
            xf = x.to(acc)
            m = torch.ones_like(xf[:, :1]) if mask is None else mask.reshape(-1, 1).to(xf.dtype)
            count, total = m.sum(), (xf * m).sum(0)
            if sync:
                count, total = self._sum(count), self._sum(total)
            mean = total / count.clamp_min(1)
            var = ((xf - mean).square() * m).sum(0)
            var = (self._sum(var) if sync else var) / count.clamp_min(1)
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp_min(1)
                seen = count > 0
                for buf, stat in ((self.running_mean, mean), (self.running_var, unbiased)):
                    old = buf.to(acc)
                    buf.copy_(torch.where(seen, old.lerp(stat, self.momentum), old))  # stored in buf's dtype
        out = (x.to(acc) - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return out.to(x.dtype)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ``sync_group``, differentiable."""
        from ..distributed.collectives import all_reduce_sum

        return all_reduce_sum(t, self.sync_group)


def make_query_norm(kind: str, heads: int, key_dim: int) -> nn.Module | None:
    """LayerNorm/RMSNorm act per head over key_dim; BatchNorm per feature of the (heads*key_dim) query."""
    if kind == "none":
        return None
    if kind == "layernorm":
        return nn.LayerNorm(key_dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(key_dim)
    if kind == "batchnorm":
        return MaskedBatchNorm(heads * key_dim)
    raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {kind!r}")
