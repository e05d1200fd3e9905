"""The obvious weighted embedding bag: gather every row, weight, sum.

It materialises the ``(T, L, d)`` gathered rows, so it is only for tests and benchmarks:
the oracle every other implementation is compared with.
"""

import torch


def embedding_bag_naive(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values (N, d), indices (T, L), weights (T, L) -> (T, d), accumulated in float32 (float64 stays)."""
    acc = torch.promote_types(values.dtype, torch.float32)
    rows = values[indices].to(acc)  # (T, L, d)
    return (rows * weights.to(acc).unsqueeze(-1)).sum(dim=1).to(values.dtype)
