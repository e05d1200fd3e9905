import contextlib
import os
import sys

import pytest
import torch

# Triton kernels run compiled on CUDA, else interpreted on CPU. Triton reads TRITON_INTERPRET once,
# when it is first imported (torch._dynamo imports it too), so it must be set here, first.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models (extra threads only cost, a lot on a busy machine)."""
    with torch_threads(1):
        yield


@contextlib.contextmanager
def torch_threads(n: int):
    """torch (and the numba kernels, which take torch's count) on n threads inside the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64, sparse tensors densified; fails on any NaN left in ``a``."""
    a = (a.to_dense() if a.is_sparse else a).double()
    b = (b.to_dense() if b.is_sparse else b).double()
    assert not a.isnan().any(), "NaN in the result (an output element was never written?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Tests parametrised over DEVICES also run on CUDA when a GPU is present (CI: CPU only).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def count_calls(monkeypatch, module: str, name: str) -> list:
    """Wrap ``module.name`` (a module's dotted name) so that every call appends 1 to the list returned (then runs it)."""
    mod = sys.modules[module]
    calls, real = [], getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a: calls.append(1) or real(*a))
    return calls


def poison_allocations(monkeypatch, int_fill: int | None = 7) -> None:
    """Every buffer allocated with torch.empty/empty_like starts as NaN (floats) or ``int_fill`` (ints; 7 is a
    row id, so that an unwritten key is read as one; None: ints left as allocated)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t if int_fill is None else t.fill_(int_fill)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture
def chunk(monkeypatch):
    """chunk(c): the sorted-segment kernel's programs (``ops.bag_update``, also the bag's sorted backward) take
    c sorted entries each (rows cut by chunk borders; any c >= 4)."""
    from memlayers.ops.bag_update import triton_kernel  # lazily: Triton is imported after TRITON_INTERPRET is set

    return lambda c: monkeypatch.setattr(triton_kernel, "chunk_size", lambda n: c)
