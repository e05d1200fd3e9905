"""A memory's usage statistics updated with one step's accesses (``memlayers.metrics.UsageTracker``):
``usage_update``, in place and without a host sync: the numba kernel (``cpu_usage.py``) for CPU tensors with float32
weights and at least ``dispatch.CPU_KERNEL_MIN_ELEMENTS`` accesses under impl "auto", else the plain-PyTorch reference
(``reference.py``); a ``torch.library`` custom op under ``torch.compile`` (``library.py``)."""

from .library import usage_update

__all__ = ["usage_update"]
