"""A memory's usage statistics updated with one step's accesses (``memlayers.metrics.UsageTracker``):
``usage_update``, a ``torch.library`` custom op (in place, no host sync) running the numba kernel (``cpu_usage.py``)
for CPU tensors under impl "auto", else the plain-PyTorch reference (``reference.py``)."""

from .library import usage_update

__all__ = ["usage_update"]
