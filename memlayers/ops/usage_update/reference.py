"""One step's accesses added to a memory's usage statistics (``memlayers.metrics.UsageTracker``), in plain PyTorch."""

import torch


def usage_update(
    counts: torch.Tensor,
    mass: torch.Tensor,
    subkey_counts: torch.Tensor,
    last_seen: torch.Tensor,
    step: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
) -> None:
    """In place: the EMAs decayed by gamma, then each real token's accesses added.

    counts, mass (N,) float32: +1 and +|weight| per access; subkey_counts (H, 2, n) float32: +1 at [h, 0, id // n]
    and [h, 1, id % n] per access (n = 0: no product keys, nothing added); last_seen (N,) int64: max with step
    (a () int64 tensor) at every id read; ids (T, H, k) int64 in [0, N), weights (T, H, k) floating, mask (T,) bool
    (True: a real token; masked tokens add nothing) or None. Ids are not checked (that would sync a GPU)."""
    T, H, k = ids.shape
    n = subkey_counts.shape[-1]
    w = weights.abs().float()  # (T, H, k)
    if mask is None:
        ones = torch.ones_like(w)
    else:
        ones = mask.reshape(T, 1, 1).float().expand(T, H, k)
        w = torch.where(mask.reshape(T, 1, 1), w, 0.0)  # not w * ones: a masked NaN weight adds nothing
    flat, ones = ids.reshape(-1), ones.reshape(-1)
    counts.mul_(gamma).index_add_(0, flat, ones)
    mass.mul_(gamma).index_add_(0, flat, w.reshape(-1))
    if n:
        i = torch.div(ids, n, rounding_mode="floor")  # (T, H, k) first-half sub-key id
        j = ids - i * n  # second-half sub-key id
        off = torch.arange(H, device=ids.device).view(H, 1) * (2 * n)  # flat offset of [h, 0, 0]
        sub = subkey_counts.mul_(gamma).view(-1)
        sub.index_add_(0, (off + i).reshape(-1), ones).index_add_(0, (off + n + j).reshape(-1), ones)
    seen = step.view(1, 1, 1)
    if mask is not None:  # a masked token writes -1, which amax ignores
        seen = torch.where(mask.reshape(T, 1, 1), seen, -1)
    last_seen.scatter_reduce_(0, flat, seen.expand(T, H, k).reshape(-1), reduce="amax")
