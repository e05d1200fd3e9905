"""Remedies for sub-keys that stop being chosen (``reference/sparse_update.md``): k-means initialisation, dead
sub-key restarts and a marginal-entropy balance loss. ``ProductKeys`` uses them when asked; all off by default.

Shapes: H heads, 2 halves, n sub-keys per half of width d = key_dim/2; sub-queries (T, H, d) per half.
"""

import math

import torch
from torch import nn


@torch.no_grad()
def kmeans(x: torch.Tensor, n: int, iters: int = 10) -> torch.Tensor:
    """n centroids of the rows of x (M, d) by Lloyd's algorithm (squared Euclidean distance), -> (n, d).

    Seeded by k-means++ (each next seed drawn with probability proportional to its squared distance from the
    seeds so far); with fewer rows than centroids, the rows drawn with replacement plus a little noise (as
    Jukebox does). A cluster that empties keeps its centroid. Uses the global RNG.
    """
    x = x.float()
    M = x.shape[0]
    if M < n:
        seeds = x[torch.randint(M, (n,), device=x.device)]
        return seeds + 0.01 * x.std(0, correction=0) * torch.randn_like(seeds)
    centroids = x.new_empty(n, x.shape[1])
    centroids[0] = x[torch.randint(M, (1,), device=x.device)]
    gap = (x - centroids[0]).square().sum(1)  # (M,) squared distance to the nearest seed so far
    for i in range(1, n):
        centroids[i] = x[torch.multinomial(gap + 1e-12, 1)]
        gap = torch.minimum(gap, (x - centroids[i]).square().sum(1))
    for _ in range(iters):
        nearest = torch.cdist(x, centroids).argmin(1)  # (M,)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, x)
        counts = torch.zeros(n, device=x.device).index_add_(0, nearest, torch.ones(M, device=x.device))
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    return centroids


def balance_loss(
    halves: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    tau: float,
    mask: torch.Tensor | None = None,
    sync_group=None,
    max_tokens: int | None = 4096,
) -> torch.Tensor:
    """Mean over heads and halves of KL(mean_x softmax(s/tau) || uniform), s the sub-query's scores against
    all n sub-keys of its half: 0 when every sub-key is equally likely over the batch, log n when one takes
    everything. Every sub-key gets a gradient (IBQ/LFQ's marginal-entropy term, FwPKM's address loss).

    halves: the two sub-queries (T, H, d) as scored; keys (H, 2, n, d) as scored; mask (T,) bool or None;
    sync_group: the marginal is over the tokens of every rank of the group (differentiable all-reduce).
    max_tokens: the marginal is estimated on at most this many random tokens (the scores against every sub-key
    cost as much as the addressing's own scoring, and their softmax is kept for the backward); None: all.
    -> scalar in [0, log n] (0 without real tokens): the mean over heads and halves, so a weight acts per half.
    """
    T, n = halves[0].shape[0], keys.shape[2]
    if max_tokens is not None and T > max_tokens:
        pick = torch.randperm(T, device=halves[0].device)[:max_tokens]
        halves, mask, T = tuple(h[pick] for h in halves), None if mask is None else mask[pick], max_tokens
    m = halves[0].new_ones(T, 1, 1) if mask is None else mask.view(T, 1, 1).to(halves[0].dtype)
    sums = [(torch.einsum("thd,hnd->thn", q, keys[:, a]).div(tau).softmax(-1) * m).sum(0) for a, q in enumerate(halves)]
    stats = torch.cat([torch.stack(sums, 1).flatten(), m.sum().view(1)])  # (H*2*n + 1,)
    if sync_group is not None:
        from ...distributed.collectives import all_reduce_sum

        stats = all_reduce_sum(stats, sync_group)
    marginal = stats[:-1].view(-1, n) / stats[-1].clamp_min(1)  # (H*2, n), rows sum to 1 (0 without tokens)
    # p log p with the log clamped: a sub-key no token gives any probability (an underflowed softmax) must get a
    # finite gradient (xlogy's is -inf at 0, and -inf * 0 = NaN downstream)
    tiny = torch.finfo(marginal.dtype).tiny
    kl = (math.log(n) + (marginal * marginal.clamp_min(tiny).log()).sum(-1)).mean()
    return torch.where(stats[-1] > 0, kl, 0.0)  # no tokens: nothing to balance


class KeyRestart(nn.Module):
    """Moves dead sub-keys to where recent sub-queries are (Jukebox, SoundStream), and resets their optimizer state.

    ``observe`` (every training forward) folds the forward's sub-key picks into EMA counts (horizon ``every``
    forwards: micro-batches under gradient accumulation) and keeps n recent sub-queries per head and half;
    ``restart`` (after every optimizer step; acting on every ``every``-th)
    finds the sub-keys whose count is below ``threshold`` times their head-half's uniform share, points each at a
    random recent sub-query (plus 1% noise) with the mean norm of the head-half's live keys, zeroes its optimizer
    state and sets its count to the uniform share.

    Buffers (in the state_dict, for exact resume): counts (H, 2, n), recent (H, 2, n, d), steps, total (sub-keys
    restarted so far).
    """

    def __init__(self, heads: int, n_keys: int, half: int, threshold: float, every: int):
        super().__init__()
        self.n_keys, self.threshold, self.every = n_keys, threshold, every
        self.gamma = 1.0 - 1.0 / every
        self.register_buffer("counts", torch.zeros(heads, 2, n_keys))
        self.register_buffer("recent", torch.zeros(heads, 2, n_keys, half))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("total", torch.zeros((), dtype=torch.long))
        self._steps = None  # a host copy of ``steps`` (read once): no device sync on the steps between restarts

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # counts stay float32 in a bf16 model (a bf16 count stops growing at 256)
        self.counts = self.counts.float()
        return self

    @torch.no_grad()
    def observe(self, halves: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """halves: sub-queries (T, H, d) as scored; ids (T, H, k) flat slot ids i*n + j; mask (T,) bool or None."""
        T, H, n = ids.shape[0], ids.shape[1], self.n_keys
        if T == 0:
            return
        real = torch.ones(T, device=ids.device) if mask is None else mask.float()
        picks = torch.stack([ids.div(n, rounding_mode="floor"), ids.remainder(n)], 2)  # (T, H, 2, k)
        flat = (picks + torch.arange(H * 2, device=ids.device).view(1, H, 2, 1) * n).flatten()
        hits = real.view(T, 1, 1, 1).expand(picks.shape).flatten()
        self.counts.mul_(self.gamma).view(-1).index_add_(0, flat, hits)
        rows = torch.multinomial(real + 1e-6, n, replacement=True)  # real tokens (padding only if there are none)
        self.recent.copy_(torch.stack([h[rows] for h in halves], 2).permute(1, 2, 0, 3))  # (H, 2, n, d)

    @torch.no_grad()
    def restart(self, keys: nn.Parameter, optimizer: torch.optim.Optimizer | None) -> int:
        """Called after every optimizer step; on every ``every``-th, restarts the dead sub-keys of ``keys``
        (H, 2, n, d) in place. Returns how many it moved (syncs with the host then; 0 otherwise, no sync)."""
        self._steps = (int(self.steps) if self._steps is None else self._steps) + 1
        self.steps.fill_(self._steps)
        if self._steps % self.every:
            return 0
        share = self.counts.sum(-1, keepdim=True) / self.n_keys  # (H, 2, 1) uniform expectation
        dead = (self.counts < self.threshold * share) & (share > 0)  # (H, 2, n)
        count = int(dead.sum())
        if count:
            # the direction of a random recent sub-query at the typical norm of the live keys: scores are dot products,
            # so a key at a query's own (larger) norm would outscore every other key for most queries and take over
            pick = torch.randint(self.n_keys, dead.shape, device=keys.device)
            target = self.recent.gather(2, pick.unsqueeze(-1).expand_as(self.recent)).float()
            target = target + 0.01 * target.std(dim=(2, 3), keepdim=True) * torch.randn_like(target)
            live = (~dead).float()
            norms = keys.detach().float().norm(dim=-1)  # (H, 2, n)
            norm = (norms * live).sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1)  # (H, 2, 1)
            target = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm.unsqueeze(-1)
            keys.copy_(torch.where(dead.unsqueeze(-1), target.to(keys.dtype), keys))
            self.counts.copy_(torch.where(dead, share, self.counts))
            if optimizer is not None:
                from ...optim.reset import reset_state  # (optim sits above the memory parts)

                reset_state(optimizer, keys, dead)
            self.total.add_(count)
        return count
