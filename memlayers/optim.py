"""Optimisation hygiene for memory layers (DESIGN.md §2).

* values get their own learning rate (default 10x the base) and, with sub-keys, no weight decay:
  AdamW decay on a table whose rows are rarely read erases them;
* value gradients are clipped separately from the rest;
* values can use a row-sparse optimizer (``SparseRowAdam``: lazy Adam, only touched rows and their
  moments change) beside dense AdamW for everything else.
"""

from collections import OrderedDict

import torch
from torch import nn

from .ops.dispatch import IMPLS as ROW_ADAM_IMPLS
from .ops.row_adam import row_adam_update
from .retrieval import ProductKeys
from .values import ValueTable

VALUE_OPTIMIZERS = ("adamw", "sparse_adam")


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def value_tables(model: nn.Module) -> list[ValueTable]:
    """Every ValueTable registered in ``model`` (a shared pool counts once)."""
    return _unique(m for m in model.modules() if isinstance(m, ValueTable))


def value_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [t.weight for t in value_tables(model)]


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.1, value_lr: float | None = None, value_lr_ratio: float = 10.0
) -> list[dict]:
    """Parameter groups, each with a ``name``:

    * ``decay``: matrices (dim >= 2) other than values and sub-keys, at ``lr`` with ``weight_decay``;
    * ``no_decay``: biases and norm gains, at ``lr``;
    * ``subkeys``: product-key tables, at ``lr``, no decay;
    * ``values``: value tables, at ``value_lr`` (default ``value_lr_ratio * lr``), no decay.

    Empty groups are left out.
    """
    values = value_parameters(model)
    subkeys = _unique(m.keys for m in model.modules() if isinstance(m, ProductKeys))
    special = {id(p) for p in values + subkeys}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    groups = [
        dict(name="decay", params=[p for p in rest if p.dim() >= 2], lr=lr, weight_decay=weight_decay),
        dict(name="no_decay", params=[p for p in rest if p.dim() < 2], lr=lr, weight_decay=0.0),
        dict(name="subkeys", params=[p for p in subkeys if p.requires_grad], lr=lr, weight_decay=0.0),
        dict(
            name="values",
            params=[p for p in values if p.requires_grad],
            lr=value_lr if value_lr is not None else value_lr_ratio * lr,
            weight_decay=0.0,
        ),
    ]
    return [g for g in groups if g["params"]]


class SparseRowAdam(torch.optim.Optimizer):
    """Lazy Adam for row-sparse gradients: only the rows present in the gradient, and their
    moments, change; untouched rows stay bit-identical and a step costs O(rows touched), not O(N).

    The update is ``torch.optim.SparseAdam``'s (bias correction from the global step count, eps
    added after the square root; tested equal), in fp32 arithmetic, done by
    ``memlayers.ops.row_adam.row_adam_update``: on CUDA one fused Triton kernel (reads g, m, v, p
    once, writes m, v, p once), elsewhere the chunked ``index_select`` / ``index_copy_`` reference.
    ``impl`` ("auto", "reference" or "triton") picks the path, as in ``row_adam_update``; "reference"
    forces the unfused one (e.g. to benchmark against it).
    Moments are kept in the parameter's dtype, as SparseAdam does. No weight decay (values take none).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        impl: str = "auto",
    ):
        if not lr > 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"SparseRowAdam: need lr > 0, eps > 0 and betas in [0, 1), got {lr}, {eps}, {betas}")
        if impl not in ROW_ADAM_IMPLS:
            raise ValueError(f"SparseRowAdam: impl must be one of {ROW_ADAM_IMPLS}, got {impl!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.impl = impl

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        "SparseRowAdam needs row-sparse gradients: build the value tables with sparse_grad=True "
                        "(MemoryConfig(sparse_values=True)), or use AdamW for dense gradients"
                    )
                grad = p.grad if p.grad.is_coalesced() else p.grad.coalesce()
                rows, grads = grad.indices()[0], grad.values()  # (U,) unique, (U, d)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                row_adam_update(p, m, v, rows, grads, group["lr"], beta1, beta2, group["eps"], t, impl=self.impl)
        return loss


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one, so LR schedulers, clipping and checkpoints see one object.

    ``param_groups`` is the concatenation of the parts' groups (the same dicts), so a scheduler
    that sets ``group["lr"]`` drives every part.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        # Optimizer.__init__ would copy the groups; we want to share the parts' own dicts.
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self):
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers")
        if parts is None or len(parts) != len(self.optimizers):
            raise ValueError(
                f"CombinedOptimizer.load_state_dict: expected states for {len(self.optimizers)} optimizers, "
                f"got {None if parts is None else len(parts)}; was the checkpoint saved with another value_optimizer?"
            )
        for opt, part in zip(self.optimizers, parts):
            opt.load_state_dict(part)

    def __repr__(self) -> str:
        return "CombinedOptimizer(\n" + "\n".join(repr(opt) for opt in self.optimizers) + "\n)"


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    value_lr: float | None = None,
    value_lr_ratio: float = 10.0,
    value_optimizer: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW over ``param_groups(model, ...)`` (fused kernels: no full-size temporaries); with
    ``value_optimizer="sparse_adam"`` the values use ``SparseRowAdam`` instead (their tables need
    ``sparse_grad=True``, i.e. layers built with ``MemoryConfig(sparse_values=True)``), so a step
    touches only the rows read.
    """
    if value_optimizer not in VALUE_OPTIMIZERS:
        raise ValueError(f"value_optimizer must be one of {VALUE_OPTIMIZERS}, got {value_optimizer!r}")
    tables = value_tables(model)
    sparse = [t for t in tables if t.sparse_grad]
    if value_optimizer == "sparse_adam" and len(sparse) != len(tables):
        raise ValueError(
            "value_optimizer='sparse_adam' needs row-sparse value gradients: build the memory layers "
            "with MemoryConfig(sparse_values=True) (or ValueTable(sparse_grad=True))"
        )
    if value_optimizer == "adamw" and sparse:
        raise ValueError(
            "value tables with sparse_grad=True produce sparse gradients that AdamW cannot take: "
            "use value_optimizer='sparse_adam', or build the layers with sparse_values=False"
        )
    groups = param_groups(model, lr, weight_decay, value_lr, value_lr_ratio)
    if value_optimizer == "sparse_adam":
        dense = [g for g in groups if g["name"] != "values"]
        value_groups = [{k: v for k, v in g.items() if k != "weight_decay"} for g in groups if g["name"] == "values"]
        parts = [_adamw(dense, lr, betas, eps)] if dense else []
        if value_groups:
            parts.append(SparseRowAdam(value_groups, lr=value_groups[0]["lr"], betas=betas, eps=eps))
        return CombinedOptimizer(parts)
    return _adamw(groups, lr, betas, eps)


def _adamw(groups: list[dict], lr: float, betas, eps: float) -> torch.optim.AdamW:
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"}  # fused AdamW: one kernel per step, no full-size temporaries
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    norms = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # rows read by several layers of a shared pool must be summed first
            norms.append(torch.linalg.vector_norm(p.grad._values().float()))
        else:
            norms.append(torch.linalg.vector_norm(p.grad.float()))
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@torch.no_grad()
def clip_grad_norms(model: nn.Module, max_norm: float | None = 1.0, value_max_norm: float | None = 1.0):
    """Clip value-table gradients and all other gradients separately (each to its own total norm).

    Handles sparse value gradients. ``None`` skips clipping that part (its norm is still returned).
    Returns (norm of the other gradients, norm of the value gradients), before clipping, as tensors.
    """
    values = [p for p in value_parameters(model) if p.grad is not None]
    value_ids = {id(p) for p in values}
    out = []
    for part, limit in (
        ([p for p in model.parameters() if p.grad is not None and id(p) not in value_ids], max_norm),
        (values, value_max_norm),
    ):
        norm = _grad_norm(part)
        if limit is not None and part:
            scale = (limit / (norm + 1e-6)).clamp(max=1.0)
            for p in part:
                p.grad.mul_(scale.to(p.grad.dtype))
        out.append(norm)
    return tuple(out)
