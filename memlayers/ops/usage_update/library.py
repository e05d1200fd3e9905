"""``memlayers::usage_update`` as a ``torch.library`` custom op that mutates the statistics in place: one node to
``torch.compile`` (the layer traces whole), the numba kernel or the reference inside. Eager calls run the same
functions without the dispatcher (``dispatch.eager_or_op``)."""

import torch
from torch import Tensor

from ..dispatch import cpu_kernels, eager_or_op, use_cpu_kernel
from . import reference


def _usage_update(
    counts: Tensor, mass: Tensor, subkey_counts: Tensor, last_seen: Tensor, step: Tensor, ids: Tensor,
    weights: Tensor, mask: Tensor | None, gamma: float, impl: str,
) -> None:  # fmt: skip
    if use_cpu_kernel(impl, weights, counts, mass, subkey_counts) and (
        kernels := cpu_kernels("usage_update.cpu_usage")
    ):
        return kernels.usage_update_cpu(counts, mass, subkey_counts, last_seen, step, ids, weights, mask, gamma)
    reference.usage_update(counts, mass, subkey_counts, last_seen, step, ids, weights, mask, gamma)


usage_update_op = torch.library.custom_op(
    "memlayers::usage_update", _usage_update, mutates_args=("counts", "mass", "subkey_counts", "last_seen")
)


def usage_update(counts, mass, subkey_counts, last_seen, step, ids, weights, mask, gamma: float, impl: str = "auto"):
    """``reference.usage_update`` (see there for the shapes), in place. impl: "auto" (the numba kernel for CPU
    tensors with float32 weights, at least ``dispatch.CPU_KERNEL_MIN_ELEMENTS`` accesses) or "reference"."""
    run = eager_or_op(usage_update_op, _usage_update)
    run(counts, mass, subkey_counts, last_seen, step, ids.long(), weights.detach(), mask, gamma, impl)
