"""Optimisation hygiene for memory layers (DESIGN.md §2).

* values get their own learning rate (by default 10x the base under Adam) and, with sub-keys, no weight decay:
  AdamW decay on a table whose rows are rarely read erases them (``groups.py``);
* value gradients are clipped separately from the rest (``clip.py``);
* values can use a row-sparse optimizer (``SparseRowAdam``, ``SparseRowAdagrad``, ``SparseRowSGD``:
  only touched rows and their state change; ``row_sparse.py``) beside dense AdamW for everything else,
  or have that update applied inside the backward (``FusedRowOptimizer``, ``fused.py``);
* ``build_optimizer`` puts it together (``build.py``).
"""

from .build import VALUE_LR_RATIOS, VALUE_OPTIMIZERS, build_optimizer
from .clip import clip_grad_norms
from .combined import CombinedOptimizer
from .fused import FusedRowOptimizer, set_lr
from .groups import (
    check_pools_registered,
    lr_decay_scale,
    param_groups,
    parameter_roles,
    value_parameters,
    value_stores,
)
from .row_sparse import RowSparseOptimizer, SparseRowAdagrad, SparseRowAdam, SparseRowSGD, row_sparse_grad

__all__ = [
    "VALUE_LR_RATIOS",
    "VALUE_OPTIMIZERS",
    "CombinedOptimizer",
    "FusedRowOptimizer",
    "RowSparseOptimizer",
    "SparseRowAdagrad",
    "SparseRowAdam",
    "SparseRowSGD",
    "build_optimizer",
    "check_pools_registered",
    "clip_grad_norms",
    "lr_decay_scale",
    "param_groups",
    "parameter_roles",
    "row_sparse_grad",
    "set_lr",
    "value_parameters",
    "value_stores",
]
