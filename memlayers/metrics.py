"""Usage metrics for one memory layer: an on-device tracker plus the small pure functions it uses.

A memory of N slots is addressed per token and head by k flat ids; for product keys N = n*n and an id
is ``i*n + j`` (i, j the sub-key ids of the two halves), which adds per-half sub-key metrics.
``UsageTracker.update`` folds each step's ids into EMA buffers with a few ``index_add_`` calls and never
syncs with the host, so it can stay on during training; ``UsageTracker.summary`` (every ~100 steps; it
syncs) turns them into floats. Definitions follow ``reference/sparse_update.md`` §5-6 (XLM's PKM metrics, the uniform-coverage ideal, per-half KL).
"""

import math

import torch
import torch.distributed as dist
from torch import nn

from .ops.usage_update import usage_update

# ----------------------------------------------------------------------------------------------
# pure functions on a distribution over the last dim (normalised here; all-zero rows give NaN)


def _normalise(p: torch.Tensor) -> torch.Tensor:
    """p (..., M) non-negative -> p / p.sum(-1); a row summing to 0 becomes NaN."""
    return p / p.sum(dim=-1, keepdim=True)


def kl_to_uniform(p: torch.Tensor) -> torch.Tensor:
    """KL(p || uniform) = log M - H(p), in nats, with 0 log 0 = 0.

    p (..., M) non-negative, normalised here -> (...). 0 for uniform, log M for a single point,
    NaN for an all-zero row. Computed in p's dtype: pass float64 for large M.
    """
    p = _normalise(p)
    kl = math.log(p.shape[-1]) + torch.xlogy(p, p).sum(dim=-1)
    return kl.clamp_min(0.0)  # rounding can leave -1e-16 for an exactly uniform p


def gini(p: torch.Tensor) -> torch.Tensor:
    """Gini coefficient ``sum_i (2i - M - 1) p_(i) / M`` over p sorted ascending, i = 1..M.

    p (..., M) non-negative, normalised here -> (...). 0 when uniform, (M-1)/M when one entry
    holds everything. (XLM's ``1 - 2 mean(cumsum(sorted p))`` is this minus 1/M.)
    """
    p = _normalise(p)
    M = p.shape[-1]
    i = torch.arange(1, M + 1, device=p.device, dtype=p.dtype)
    return ((2 * i - M - 1) * p.sort(dim=-1).values).sum(dim=-1) / M


def mass_quantile_counts(p: torch.Tensor, qs=(0.5, 0.9, 0.99), rtol: float = 1e-6) -> torch.Tensor:
    """Smallest number of entries whose total holds a fraction q of the mass, for each q in qs.

    p (M,) non-negative, normalised here -> (len(qs),) int64. A cumulative sum within ``rtol``
    of q counts as reaching it, so that uniform p gives exactly ceil(q*M). All-zero p gives -1.
    """
    if p.dim() != 1:
        raise ValueError(f"mass_quantile_counts: p must be 1-D (M,), got shape {tuple(p.shape)}")
    cum = _normalise(p).sort(descending=True).values.cumsum(0)  # (M,) rising to 1
    q = torch.tensor(qs, dtype=cum.dtype, device=cum.device) * (1 - rtol)
    counts = (torch.searchsorted(cum, q) + 1).clamp_max(p.shape[0])
    return torch.where(cum[-1].isnan(), torch.full_like(counts, -1), counts)


def _stat_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # mps has no float64


# ----------------------------------------------------------------------------------------------


class UsageTracker(nn.Module):
    """EMA usage statistics of one memory of N slots read by `heads` heads (N = n_keys**2 for product keys).

    Buffers (``persistent=False``: they follow ``.to(device)`` but stay out of ``state_dict``;
    floating buffers stay float32 through ``.half()`` / ``.to(torch.bfloat16)``):
        counts (N,) float32          EMA of unweighted accesses per slot
        mass (N,) float32            EMA of |weight| per slot (|.|: identity scores may be < 0)
        subkey_counts (H, 2, n)      EMA of accesses per (head, half, sub-key): slot ``i*n+j``
                                     read by head h adds 1 to [h, 0, i] and [h, 1, j] (product
                                     keys only; (H, 2, 0) when ``n_keys`` is None)
        last_seen (N,) int64         update number (0-based) of the last access, -1 = never
        (and the counters: updates, real tokens seen, accesses per update over the last `window`)

    Each ``update`` decays the EMAs by gamma = 1 - 1/window, then adds the step's accesses.

    Args:
        n_keys: n, sub-keys per half (the memory has N = n*n slots), or None for slots without
            product structure (then ``num_slots`` gives N and the sub-key metrics are NaN).
        heads: H, heads per token.
        window: EMA horizon and coverage window, in updates.
        dead_threshold: a sub-key is dead if its EMA count is below this fraction of the
            uniform expectation (its head-half's total / n).
        num_slots: N; None = n_keys**2.
    """

    def __init__(
        self,
        n_keys: int | None,
        heads: int,
        window: int = 100,
        dead_threshold: float = 0.01,
        *,
        num_slots: int | None = None,
    ):
        super().__init__()
        if n_keys is None and num_slots is None:
            raise ValueError("UsageTracker: give n_keys (product keys) or num_slots")
        if n_keys is not None and n_keys < 1:
            raise ValueError(f"UsageTracker: n_keys (sub-keys per half) must be >= 1, got {n_keys}")
        if num_slots is not None and num_slots < 1:
            raise ValueError(f"UsageTracker: num_slots must be >= 1, got {num_slots}")
        if heads < 1:
            raise ValueError(f"UsageTracker: heads must be >= 1, got {heads}")
        if window < 1:
            raise ValueError(f"UsageTracker: window must be >= 1 update, got {window}")
        if not dead_threshold >= 0:
            raise ValueError(f"UsageTracker: dead_threshold must be >= 0, got {dead_threshold}")
        self.n_keys, self.heads, self.window = n_keys, heads, window
        self.num_slots = n_keys * n_keys if num_slots is None else num_slots
        self.dead_threshold = dead_threshold
        self.gamma = 1.0 - 1.0 / window
        N, H = self.num_slots, heads
        self.register_buffer("counts", torch.zeros(N), persistent=False)
        self.register_buffer("mass", torch.zeros(N), persistent=False)
        self.register_buffer("subkey_counts", torch.zeros(H, 2, n_keys or 0), persistent=False)
        self.register_buffer("last_seen", torch.full((N,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("_step", torch.zeros((), dtype=torch.long), persistent=False)  # == updates
        self.register_buffer("_tokens", torch.zeros((), dtype=torch.long), persistent=False)  # real tokens seen
        # accesses (real tokens * H * k) of update u at [u % window]: the last `window` updates' accesses
        self.register_buffer("_window_accesses", torch.zeros(window, dtype=torch.long), persistent=False)

    def reset(self) -> None:
        """Forget everything recorded (buffers stay on their device)."""
        self.counts.zero_()
        self.mass.zero_()
        self.subkey_counts.zero_()
        self.last_seen.fill_(-1)
        self._step.zero_()
        self._tokens.zero_()
        self._window_accesses.zero_()

    reset_buffers = reset  # (what loading into a model built on the meta device asks: see MemoryPart)

    _STATE_BUFFERS = ("counts", "mass", "subkey_counts", "last_seen", "_step", "_tokens", "_window_accesses")

    def tracker_state(self) -> dict:
        """Everything recorded, as CPU tensors: the buffers (kept out of ``state_dict``, so model
        checkpoints stay pure weights), and ``updates``. For exact training resume."""
        state = {b: getattr(self, b).detach().cpu().clone() for b in self._STATE_BUFFERS}
        state["updates"] = int(self._step)
        return state

    _SUMMED = ("counts", "mass", "subkey_counts", "_tokens", "_window_accesses")  # linear in the tokens seen

    @torch.no_grad()
    def all_reduce_(self, group=None) -> None:
        """In place, what one tracker would have recorded from the tokens of every rank of ``group`` (collective):
        the counts are linear in the tokens (sums of decayed counts), so they add up; ``last_seen`` is the
        latest of the ranks'."""
        for name in self._SUMMED:
            dist.all_reduce(getattr(self, name), group=group)
        dist.all_reduce(self.last_seen, op=dist.ReduceOp.MAX, group=group)

    @torch.no_grad()
    def clear_counts_(self) -> None:
        """Zero what ``all_reduce_`` sums (the updates counter stays): on every rank but one, after loading an
        all-reduced state, so that the ranks' sums stay the global counts."""
        for name in self._SUMMED:
            getattr(self, name).zero_()

    def load_tracker_state(self, state: dict) -> None:
        """Restore what ``tracker_state`` returned (onto this tracker's device), also from older versions
        (which kept the token count and the window's accesses on the host)."""
        if "_tokens" not in state:
            state = {**state, "_tokens": state["_masked_tokens"] + int(state["host_tokens"])}
            ring = torch.zeros(self.window, dtype=torch.long)
            updates = int(state["updates"])
            for age, (tokens, per_token) in enumerate(reversed(state["window"]), start=1):
                ring[(updates - age) % self.window] = int(tokens) * int(per_token)
            state["_window_accesses"] = ring
        for b in self._STATE_BUFFERS:
            getattr(self, b).copy_(state[b])

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would otherwise cast the EMA buffers too: a bf16 count stops
        # growing at 256. Keep them float32 whatever the model's dtype.
        super()._apply(fn, recurse)
        for name in ("counts", "mass", "subkey_counts"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def _check(self, indices, weights, mask):
        name = type(self).__name__
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}.update: indices must be int64 (or int32) flat slot ids, got {indices.dtype}")
        if indices.dim() < 2 or indices.shape[-2] != self.heads or indices.shape[-1] < 1:
            raise ValueError(
                f"{name}.update: indices must be (..., heads={self.heads}, k), got shape {tuple(indices.shape)}; "
                f"pass the (tokens, heads, k) ids of the layer this tracker was built for (heads={self.heads})"
            )
        if weights.shape != indices.shape:
            raise ValueError(
                f"{name}.update: weights shape {tuple(weights.shape)} must equal indices shape {tuple(indices.shape)} "
                "(one weight per selected slot)"
            )
        if not (weights.is_floating_point() and indices.device == weights.device == self.counts.device):
            raise ValueError(
                f"{name}.update: weights must be floating point and indices, weights and the tracker on one device; "
                f"got weights {weights.dtype}, devices {indices.device}, {weights.device}, "
                f"tracker {self.counts.device} "
                "(move the tracker with .to(device))"
            )
        if mask is not None:
            if mask.shape != indices.shape[:-2]:
                raise ValueError(
                    f"{name}.update: mask shape {tuple(mask.shape)} must equal indices.shape[:-2] = "
                    f"{tuple(indices.shape[:-2])} (one flag per token, True = real token)"
                )
            if mask.dtype != torch.bool or mask.device != indices.device:
                raise ValueError(
                    f"{name}.update: mask must be a bool tensor on {indices.device} (True = real token), "
                    f"got {mask.dtype} on {mask.device}; pass mask.bool().to(device)"
                )

    @torch.no_grad()
    def update(self, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Record one step's accesses. Never syncs with the host (no .item(), no data-dependent shapes, no
        host-side counters: ``torch.compile`` traces it whole).

        Args:
            indices: (..., H, k) int64 flat slot ids ``i*n + j``. Their range is *not* checked
                (that would sync): out-of-range ids raise on CPU and hit a device assert on CUDA.
            weights: (..., H, k) the scores used to mix the values; |weight| is accumulated.
                May require grad (it is detached).
            mask: (...) bool, True = real token, or None (all real). Masked tokens change
                nothing but still count as an update (the EMAs decay).
        """
        self._check(indices, weights, mask)
        H, k = self.heads, indices.shape[-1]
        idx = indices.reshape(-1, H, k)  # (T, H, k)
        T = idx.shape[0]
        mask = None if mask is None else mask.reshape(T)
        n_real = self._step.new_full((1,), T) if mask is None else mask.sum().view(1)  # read in summary() only
        self._tokens.add_(n_real[0])
        self._window_accesses.index_copy_(0, self._step.remainder(self.window).view(1), n_real * (H * k))
        usage_update(self.counts, self.mass, self.subkey_counts, self.last_seen, self._step, idx,
                     weights.reshape(T, H, k), mask, self.gamma)  # fmt: skip
        self._step.add_(1)

    @torch.no_grad()
    def summary(self) -> dict[str, float]:
        """Summarise the buffers as floats (syncs with the device; call it every ~100 steps).

        With p the normalised EMA counts (unweighted) or |weight| mass (weighted) over N slots:
            coverage         fraction of the N slots accessed within the last `window` updates
            coverage_ideal   U* = 1 - exp(-A/N), A = accesses (real tokens * H * k) in those
                             updates: what uniform random ids would cover
            coverage_ratio   coverage / coverage_ideal
            kl_unweighted, kl_weighted         KL(p || uniform) = log N - H(p), nats
            usage_unweighted, usage_weighted   exp(-KL) = exp(H(p)) / N, effective used fraction
            gini_unweighted, gini_weighted     Gini of p: 0 uniform, (N-1)/N one slot
            top50, top90, top99   fewest slots holding 50/90/99% of the unweighted mass
            subkey_kl_first, subkey_kl_second  mean over heads of KL(p_half || uniform over n)
                             (NaN, as dead_subkeys, without product keys)
            dead_subkeys     fraction of (head, half, sub-key) with EMA count below
                             dead_threshold * (that head-half's total / n)
            tokens_seen      real (unmasked) tokens since the last reset
            updates          update() calls since the last reset
        Undefined entries (nothing recorded yet, or only masked tokens) are NaN.
        """
        dev = self.counts.device
        dt = _stat_dtype(dev)
        nan = torch.tensor(float("nan"), dtype=dt, device=dev)
        N = self.num_slots

        A = self._window_accesses.sum().to(dt)
        first = (self._step - self.window).clamp_min(0)  # oldest update number inside the window
        updated = self._step > 0
        coverage = torch.where(updated, (self.last_seen >= first).to(dt).mean(), nan)
        ideal = torch.where(updated, -torch.expm1(-A / N), nan)
        ratio = torch.where(ideal > 0, coverage / ideal, nan)

        stats = {"coverage": coverage, "coverage_ideal": ideal, "coverage_ratio": ratio}
        p_unweighted, p_weighted = self.counts.to(dt), self.mass.to(dt)
        stats["kl_unweighted"], stats["kl_weighted"] = kl_to_uniform(p_unweighted), kl_to_uniform(p_weighted)
        stats["usage_unweighted"] = (-stats["kl_unweighted"]).exp()
        stats["usage_weighted"] = (-stats["kl_weighted"]).exp()
        stats["gini_unweighted"], stats["gini_weighted"] = gini(p_unweighted), gini(p_weighted)
        top = mass_quantile_counts(p_unweighted, (0.5, 0.9, 0.99)).to(dt)
        top = torch.where(top < 0, nan, top)
        stats.update(top50=top[0], top90=top[1], top99=top[2])

        if self.n_keys is None:
            stats.update(subkey_kl_first=nan, subkey_kl_second=nan, dead_subkeys=nan)
        else:
            sub = self.subkey_counts.to(dt)  # (H, 2, n)
            sub_kl = kl_to_uniform(sub).mean(dim=0)  # (2,)
            stats.update(subkey_kl_first=sub_kl[0], subkey_kl_second=sub_kl[1])
            total = sub.sum(dim=-1, keepdim=True)  # (H, 2, 1)
            dead = (sub < self.dead_threshold * total / self.n_keys).to(dt).mean()
            stats["dead_subkeys"] = torch.where(total.min() > 0, dead, nan)

        stats["tokens_seen"] = self._tokens.to(dt)
        stats["updates"] = self._step.to(dt)
        return dict(zip(stats.keys(), torch.stack(list(stats.values())).tolist()))  # the one sync

    def extra_repr(self) -> str:
        return (
            f"n_keys={self.n_keys}, num_slots={self.num_slots}, heads={self.heads}, window={self.window}, "
            f"dead_threshold={self.dead_threshold}"
        )
