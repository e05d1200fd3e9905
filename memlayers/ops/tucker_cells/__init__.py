"""UltraMem's cell scores (multi-core scoring): ``tucker_cells(sr, sc, cores) -> (T, H, C, k)``, each selected slot's
score under every core from its row's and column's side scores, differentiable in all three.

One ``torch.library`` custom op each way (``library.py``): float32 CPU tensors run the numba kernels
(``cpu_cells.py``), everything else the plain-PyTorch reference (``reference.py``); both compute the same function.
"""

from .library import tucker_cells
from .reference import cell_scores, cell_scores_backward

__all__ = ["cell_scores", "cell_scores_backward", "tucker_cells"]
