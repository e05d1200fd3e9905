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
    """||a - b|| / ||b|| in float64 (0 when both are empty or zero)."""
    a, b = a.double(), b.double()
    denom = b.norm()
    return 0.0 if denom == 0 and a.norm() == 0 else ((a - b).norm() / denom).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Tests parametrised over DEVICES also run on CUDA when a GPU is present (CI: CPU only).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
