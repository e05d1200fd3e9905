"""Query normalisations for retrieval: a BatchNorm that respects padding, whitening by running statistics,
and LayerNorm/RMSNorm over the whole query of a head or over each of its halves.

A norm with ``takes_mask = True`` acts on the flat query (T, heads*key_dim) with the padding mask; the others
act on (T, heads, key_dim)."""

import torch
import torch.nn.functional as F
from torch import nn

QUERY_NORMS = ("none", "layernorm", "rmsnorm", "batchnorm", "whiten", "layernorm_half", "rmsnorm_half")


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

    takes_mask = True

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


class RunningWhitening(nn.Module):
    """ZCA whitening of each head's query by running statistics, then a learned per-feature scale and shift.

    ``y = (x - mean) @ W * weight + bias`` per head, ``W = (cov + eps I)^-1/2`` (symmetric: each feature stays
    mostly itself, so the two halves stay halves). Unlike a BatchNorm it also decorrelates the features,
    including the two halves of a query (whose correlation makes a product key's slot usage worse than its
    per-half usage shows), and it always applies the running statistics: a token's output never depends on its
    batch (nor, in a causal model, on later tokens). A training forward normalises with the statistics as they
    were, then folds its real tokens (``mask`` True) into them: the first batch sets them, later ones move them by
    ``momentum``; no gradient flows through them. W is recomputed from them every ``refresh`` training forwards
    (an eigendecomposition, which waits for the GPU) and starts as the identity. With ``sync_group`` (set by
    ``parallelize``) the batch statistics are those of the group's tokens together. Buffers stay float32 in a
    bf16 model.

    x (T, heads*dim), mask (T,) bool or None -> (T, heads*dim)
    """

    takes_mask = True

    def __init__(self, heads: int, dim: int, eps: float = 1e-5, momentum: float = 0.1, refresh: int = 10):
        super().__init__()
        self.heads, self.dim, self.eps, self.momentum, self.refresh = heads, dim, eps, momentum, refresh
        self.weight = nn.Parameter(torch.ones(heads * dim))
        self.bias = nn.Parameter(torch.zeros(heads * dim))
        self.register_buffer("running_mean", torch.zeros(heads, dim))
        self.register_buffer("running_cov", torch.eye(dim).repeat(heads, 1, 1))
        self.register_buffer("whitening", torch.eye(dim).repeat(heads, 1, 1))  # (H, dim, dim): W of the statistics
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))  # training forwards so far
        self.sync_group = None
        self._forwards = None  # a host copy of ``forwards`` (read once): no device sync per forward

    def flops_per_token(self) -> int:
        return 2 * self.heads * self.dim**2

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("running_mean", "running_cov", "whitening"):  # a bf16 mean of a large shared offset loses it
            setattr(self, name, getattr(self, name).float())
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._forwards = None

    @torch.no_grad()
    def _update(self, x: torch.Tensor, mask: torch.Tensor | None, first: bool) -> None:
        """Fold the batch's real tokens into the running statistics (the first batch sets them)."""
        H, d = self.heads, self.dim
        xc = x.detach().float().view(x.shape[0], H, d) - self.running_mean  # centred first: fp32 keeps the variance
        if mask is not None:
            xc = xc * mask.view(-1, 1, 1)
        count = xc.new_tensor(float(x.shape[0])) if mask is None else mask.sum().float()
        stats = torch.cat([count.view(1), xc.sum(0).flatten(), torch.einsum("thi,thj->hij", xc, xc).flatten()])
        if self.sync_group is not None:
            torch.distributed.all_reduce(stats, group=self.sync_group)
        count, total, outer = stats[0], stats[1 : 1 + H * d].view(H, d), stats[1 + H * d :].view(H, d, d)
        shift = total / count.clamp_min(1)  # the batch mean minus the running one
        cov = (outer - count * shift.unsqueeze(-1) * shift.unsqueeze(-2)) / (count - 1).clamp_min(1)
        rate = (1.0 if first else self.momentum) * (count > 1)  # fewer than 2 real tokens: nothing to learn
        self.running_mean.add_(rate * shift)
        self.running_cov.lerp_(cov, rate)

    @torch.no_grad()
    def _refresh(self) -> None:
        values, vectors = torch.linalg.eigh(self.running_cov.double())
        scale = (values.clamp_min(0) + self.eps).rsqrt()
        # a new tensor, not copy_: this forward's output was computed with (and its backward keeps) the old one
        self.whitening = (vectors * scale.unsqueeze(-2) @ vectors.mT).to(self.whitening.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xh = x.to(acc).view(x.shape[0], self.heads, self.dim) - self.running_mean.to(acc)
        y = torch.einsum("thi,hij->thj", xh, self.whitening.to(acc)).reshape(x.shape)
        if self.training:  # after normalising: the batch never shapes its own output
            self._learn(x, mask)
        return (y * self.weight + self.bias).to(x.dtype)

    @torch.compiler.disable  # host-side counting: eager under torch.compile (a graph break, no recompiles)
    def _learn(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self._forwards is None:
            self._forwards = int(self.forwards)
        self._update(x, mask, first=self._forwards == 0)
        if self._forwards % self.refresh == 0:
            self._refresh()
        self._forwards += 1
        self.forwards.fill_(self._forwards)


class PerHalf(nn.Module):
    """A norm over each half of each head's query: (T, H, key_dim) -> (T, H, key_dim)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.norm(q.unflatten(-1, (2, -1))).flatten(-2)


def make_query_norm(kind: str, heads: int, key_dim: int) -> nn.Module | None:
    """LayerNorm/RMSNorm act per head over key_dim (``_half``: over each half of it, with its own gain);
    BatchNorm per feature of the (heads*key_dim) query; whitening per head."""
    if kind == "none":
        return None
    if kind == "layernorm":
        return nn.LayerNorm(key_dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(key_dim)
    if kind == "layernorm_half":
        return PerHalf(nn.LayerNorm(key_dim // 2))
    if kind == "rmsnorm_half":
        return PerHalf(nn.RMSNorm(key_dim // 2))
    if kind == "batchnorm":
        return MaskedBatchNorm(heads * key_dim)
    if kind == "whiten":
        return RunningWhitening(heads, key_dim)
    raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {kind!r}")
