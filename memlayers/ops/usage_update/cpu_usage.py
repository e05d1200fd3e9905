"""``reference.usage_update`` on CPU, compiled by numba: one pass over the accesses instead of ~15 torch ops, with the
reference's floats (each EMA decayed by gamma in float32, then the accesses added in order). Optional, like
``embedding_bag/cpu_bag_into.py``: numba and ``MEMLAYERS_CPU_KERNELS``.
"""

import numba
import numpy as np

from ..embedding_bag.reference import check_ids


def usage_update_cpu(counts, mass, subkey_counts, last_seen, step, ids, weights, mask, gamma: float) -> None:
    """``reference.usage_update`` for CPU tensors (counts, mass, subkey_counts float32, last_seen int64, weights
    float32); ids outside [0, N) (and [0, n²) with sub-key counts) are refused: the kernel writes without checks."""
    T, H = ids.shape[:2]
    n = subkey_counts.shape[2]
    if weights.shape != ids.shape or (mask is not None and mask.shape != (T,)) or subkey_counts.shape[:2] != (H, 2):
        raise ValueError(f"usage_update: need ids and weights (T, H, k), mask (T,) or None, subkey_counts (H, 2, n), "
                         f"got {tuple(ids.shape)}, {tuple(weights.shape)}, "
                         f"{None if mask is None else tuple(mask.shape)}, {tuple(subkey_counts.shape)}")  # fmt: skip
    check_ids("UsageTracker.update", "indices", ids, min(counts.shape[0], n * n) if n else counts.shape[0])
    real = np.empty(0, np.bool_) if mask is None else mask.contiguous().numpy()
    w = weights.detach().contiguous().numpy()
    _update(counts.numpy(), mass.numpy(), subkey_counts.numpy(), last_seen.numpy(), step.item(),
            ids.contiguous().numpy(), w, real, np.float32(gamma))  # fmt: skip


@numba.njit(cache=True)
def _update(counts, mass, sub, last_seen, step, ids, w, real, gamma):
    counts *= gamma
    mass *= gamma
    sub *= gamma
    T, H, k = ids.shape
    n = sub.shape[2]
    for t in range(T):
        if real.shape[0] and not real[t]:
            continue
        for h in range(H):
            for q in range(k):
                i = ids[t, h, q]
                counts[i] += np.float32(1.0)
                mass[i] += abs(w[t, h, q])
                last_seen[i] = max(last_seen[i], step)
                if n:
                    sub[h, 0, i // n] += np.float32(1.0)
                    sub[h, 1, i % n] += np.float32(1.0)
