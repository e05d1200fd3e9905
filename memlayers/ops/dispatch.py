"""Choosing between an op's Triton kernel and its plain-PyTorch reference."""

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings

import torch

IMPLS = ("auto", "reference", "triton")
CPU_KERNELS_ENV = "MEMLAYERS_CPU_KERNELS"  # "0": no numba kernel, the references on CPU


def full_precision(device: torch.device):
    """A context turning autocast off on ``device`` when it is on, so that scores, top-k selections and
    pre-activations are computed in the dtype the code asks for (autocast would run their matmuls in
    bf16/fp16); a no-op elsewhere (also on devices without autocast, e.g. meta)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # no autocast for this device type
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def use_triton(op: str, impl: str, tensor: torch.Tensor, problem: str | None = None) -> bool:
    """Resolve ``impl`` for an op whose inputs live where ``tensor`` does.

    "auto": the kernel for CUDA tensors when Triton is installed and ``problem`` is None, else the
    reference. "reference": the reference. "triton": the kernel (on CPU only under
    ``TRITON_INTERPRET=1``), or an error saying why it cannot run (``problem``: why the kernel
    cannot take these inputs, or None).
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if impl == "auto":
        return tensor.is_cuda and problem is None and importlib.util.find_spec("triton") is not None
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is first "
            "imported, to run the kernels interpreted on CPU); use impl='auto'"
        )
    if problem is not None:
        raise ValueError(f"{op}: impl='triton' cannot run: {problem}; use impl='auto' or 'reference'")
    return True


def eager_or_op(op, fn):
    """``fn``, a custom op's Python implementation, in eager mode, and the op ``op`` itself while ``torch.compile``
    traces (also an autograd function's backward): there the op is one node of the graph, while eagerly the
    dispatcher's per-call bookkeeping (~0.1 ms a call on CPU) buys nothing."""
    return op if torch.compiler.is_compiling() else fn


CPU_KERNEL_MIN_ELEMENTS = 16384  # smaller problems take the reference: not worth numba's ~2 s start in a process


def use_cpu_kernel(impl: str, *tensors: torch.Tensor) -> bool:
    """Whether an op's numba kernel (``ops/<op>/cpu_*.py``) runs: ``impl`` "auto", every tensor float32 on the CPU,
    the first of at least ``CPU_KERNEL_MIN_ELEMENTS`` elements, numba installed, ``MEMLAYERS_CPU_KERNELS`` not "0"."""
    return (
        impl == "auto"
        and tensors[0].numel() >= CPU_KERNEL_MIN_ELEMENTS
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and os.environ.get(CPU_KERNELS_ENV, "1") != "0"
        and importlib.util.find_spec("numba") is not None
    )


@functools.cache
def cpu_kernels(module: str):
    """The numba kernels' module ``memlayers.ops.<module>``, or None (warned once) when numba is installed but
    the module does not load (numba does not import, or finds no writable directory for its on-disk cache): the
    callers then run their references."""
    try:
        return importlib.import_module(f"memlayers.ops.{module}")
    except (ImportError, RuntimeError) as e:
        warnings.warn(f"memlayers: numba is installed but the CPU kernels do not load ({e}); the CPU ops run their "
                      f"plain-torch references (the same results, slower). Set {CPU_KERNELS_ENV}=0 to silence this.")  # fmt: skip
        return None
