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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64, sparse tensors densified; fails on any NaN left in ``a``."""
    a = (a.to_dense() if a.is_sparse else a).double()
    b = (b.to_dense() if b.is_sparse else b).double()
    assert not a.isnan().any(), "NaN in the result (an output element was never written?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Tests parametrised over DEVICES also run on CUDA when a GPU is present (CI: CPU only).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
