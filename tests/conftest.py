import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run interpreted on CPU; Triton reads this once, when it is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64, sparse tensors densified; fails on any NaN left in ``a``."""
    a = (a.to_dense() if a.is_sparse else a).double()
    b = (b.to_dense() if b.is_sparse else b).double()
    assert not a.isnan().any(), "NaN in the result (an output element was never written?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Tests parametrised over DEVICES also run on CUDA when a GPU is present (CI: CPU only).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
