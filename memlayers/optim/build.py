"""``build_optimizer``: AdamW for the dense parameters, a chosen optimizer for the value tables."""

import torch
from torch import nn

from .combined import CombinedOptimizer
from .fused import RULES, FusedRowOptimizer
from .groups import param_groups, value_stores
from .row_sparse import SparseRowAdagrad, SparseRowAdam, SparseRowSGD

VALUE_OPTIMIZERS = ("adamw", "sparse_adam", "sparse_adagrad", "sparse_sgd")
# value lr / base lr when none is given. Adagrad's and SGD's steps scale differently from Adam's:
# these are the best of the ratios tried on the facts tasks (README, "Value learning rates").
VALUE_LR_RATIOS = {"adamw": 10.0, "sparse_adam": 10.0, "sparse_adagrad": 1000.0, "sparse_sgd": 3e7}


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    value_lr: float | None = None,
    value_lr_ratio: float | None = None,
    value_optimizer: str = "adamw",
    fused_values: bool = False,
    stochastic_rounding: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over ``param_groups(model, ...)`` (fused kernels: no full-size temporaries).

    ``value_optimizer`` picks what updates the value tables: "adamw" (with the rest), or a
    row-sparse optimizer that touches only the rows a step read: "sparse_adam" (``SparseRowAdam``,
    same betas/eps), "sparse_adagrad" (``SparseRowAdagrad``, eps) or "sparse_sgd"
    (``SparseRowSGD``). The sparse ones need ``sparse_grad=True`` tables, i.e. layers built with
    ``MemoryConfig(sparse_values=True)``, and return a ``CombinedOptimizer``.

    The values learn at ``value_lr``, else ``value_lr_ratio * lr``, where ``value_lr_ratio=None``
    takes ``VALUE_LR_RATIOS[value_optimizer]`` (10 for the Adam variants; far more for Adagrad and SGD).

    ``fused_values=True`` (with a row-sparse ``value_optimizer``) applies that optimizer's update inside the
    backward instead (``FusedRowOptimizer``): the tables get no gradients, ``sparse_values`` does not matter,
    and value gradients cannot be clipped. ``stochastic_rounding``: bfloat16 tables only, fused only.
    """
    if value_optimizer not in VALUE_OPTIMIZERS:
        raise ValueError(f"value_optimizer must be one of {VALUE_OPTIMIZERS}, got {value_optimizer!r}")
    if fused_values and value_optimizer == "adamw":
        raise ValueError(
            f"fused_values=True updates the values with a row-wise rule: choose value_optimizer in {VALUE_OPTIMIZERS[1:]}"
        )
    if stochastic_rounding and not fused_values:
        raise ValueError("stochastic_rounding is an option of the fused value update: set fused_values=True too")
    tables = [s for s in value_stores(model) if s.param_roles().get("values")]
    sparse = [t for t in tables if t.sparse_grad]
    for store in tables:  # a previous fused optimizer's routing is undone unless this one is fused too
        for p in store.param_roles()["values"]:
            store.set_value_grad_sink(p, None)
    if value_optimizer != "adamw" and not fused_values and len(sparse) != len(tables):
        raise ValueError(
            f"value_optimizer={value_optimizer!r} needs row-sparse value gradients: build the memory layers "
            "with sparse_values=True (or ValueTable(sparse_grad=True))"
        )
    if value_optimizer == "adamw" and sparse:
        raise ValueError(
            "value tables with sparse_grad=True produce sparse gradients that AdamW cannot take: use "
            f"value_optimizer in {VALUE_OPTIMIZERS[1:]}, or build the layers with sparse_values=False"
        )
    if value_lr_ratio is None:
        value_lr_ratio = VALUE_LR_RATIOS[value_optimizer]
    groups = param_groups(model, lr, weight_decay, value_lr, value_lr_ratio)
    if value_optimizer == "adamw":
        return _adamw(groups, lr, betas, eps)
    dense = [g for g in groups if g["name"] != "values"]
    value_groups = [{k: v for k, v in g.items() if k != "weight_decay"} for g in groups if g["name"] == "values"]
    parts = [_adamw(dense, lr, betas, eps)] if dense else []
    if value_groups:
        value_lr = value_groups[0]["lr"]
        if fused_values:
            fused = FusedRowOptimizer(
                value_groups, RULES[value_optimizer], value_lr, betas, eps, stochastic_rounding=stochastic_rounding
            )
            for store in tables:
                for p in store.param_roles()["values"]:
                    if p.requires_grad:
                        fused.attach(store, p)
            parts.append(fused)
        elif value_optimizer == "sparse_adam":
            parts.append(SparseRowAdam(value_groups, lr=value_lr, betas=betas, eps=eps))
        elif value_optimizer == "sparse_adagrad":
            parts.append(SparseRowAdagrad(value_groups, lr=value_lr, eps=eps))
        else:
            parts.append(SparseRowSGD(value_groups, lr=value_lr))
    return CombinedOptimizer(parts)


def _adamw(groups: list[dict], lr: float, betas, eps: float) -> torch.optim.AdamW:
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"}  # fused AdamW: one kernel per step, no full-size temporaries
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
