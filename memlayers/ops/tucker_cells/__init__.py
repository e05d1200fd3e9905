"""UltraMem's cell scores (multi-core scoring): ``tucker_cells(sr, sc, cores) -> (T, H, C, k)``, each selected slot's
score under every core from its row's and column's side scores, differentiable in all three.

Float32 CPU tensors run the numba kernels (``cpu_cells.py``), everything else the plain-PyTorch reference
(``reference.py``); both compute the same function. Eager calls run them directly, ``torch.compile`` sees one
``torch.library`` custom op each way (``library.py``). ``library.tucker_sides_backward``: the gradients of the side
scores at the chosen cells in the queries and keys (UltraMem's ``SelectedScores``).
"""

from .library import tucker_cells
from .reference import cell_scores, cell_scores_backward

__all__ = ["cell_scores", "cell_scores_backward", "tucker_cells"]
