"""Optimisation hygiene for memory layers (DESIGN.md §2).

* values get their own learning rate (by default 10x the base under Adam) and, with sub-keys, no weight decay:
  AdamW decay on a table whose rows are rarely read erases them;
* value gradients are clipped separately from the rest;
* values can use a row-sparse optimizer (``SparseRowAdam``, ``SparseRowAdagrad``, ``SparseRowSGD``:
  only touched rows and their state change) beside dense AdamW for everything else.
"""

from collections import OrderedDict
from typing import ClassVar

import torch
from torch import nn

from .memory.layer import MemoryLayer
from .memory.parts import MemoryPart, ValueStore
from .ops.dispatch import IMPLS as ROW_UPDATE_IMPLS
from .ops.row_update import row_adagrad_update, row_adam_update, row_sgd_update

VALUE_OPTIMIZERS = ("adamw", "sparse_adam", "sparse_adagrad", "sparse_sgd")
# value lr / base lr when none is given. Adagrad's and SGD's steps scale differently from Adam's:
# these are the best of the ratios tried on the facts tasks (README, "Value learning rates").
VALUE_LR_RATIOS = {"adamw": 10.0, "sparse_adam": 10.0, "sparse_adagrad": 1000.0, "sparse_sgd": 3e7}


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def parameter_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{"keys": [...], "values": [...]}: the parameters memory parts declare in those roles, each once
    (a shared pool counts once). Everything else is "dense"."""
    roles: dict[str, list] = {"keys": [], "values": []}
    for m in model.modules():
        if isinstance(m, MemoryPart):
            for role, params in m.param_roles().items():
                if role in roles:
                    roles[role].extend(params)
    return {role: _unique(params) for role, params in roles.items()}


def value_stores(model: nn.Module) -> list[ValueStore]:
    """Every value store registered in ``model`` (a shared pool counts once)."""
    return _unique(m for m in model.modules() if isinstance(m, ValueStore))


def value_parameters(model: nn.Module) -> list[nn.Parameter]:
    return parameter_roles(model)["values"]


def check_pools_registered(model: nn.Module) -> None:
    """Raise if a memory layer of ``model`` reads a store that ``model`` does not hold (it would not be
    trained, moved or saved)."""
    held = {id(m) for m in model.modules()}
    for name, m in model.named_modules():
        if isinstance(m, MemoryLayer) and id(m.store.root()) not in held:
            raise ValueError(
                f"memory layer {name or 'model'!r} reads a shared pool that the model does not hold, so it would "
                "not be trained or saved: register the pool in the model (e.g. self.pool = pool)"
            )


def lr_decay_scale(decay: tuple[float, float] | None, step: int, total: int) -> float:
    """The multiplier of a group's lr at ``step`` of ``total`` for ``decay = (start, fraction)``: ``start``
    at step 0, falling linearly to 1 at ``fraction * total`` and 1 after (UltraMem's value lr decay); 1 for None."""
    if decay is None:
        return 1.0
    start, fraction = decay
    return 1.0 + (start - 1.0) * max(0.0, 1.0 - step / max(1.0, fraction * total))


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.1, value_lr: float | None = None, value_lr_ratio: float = 10.0
) -> list[dict]:
    """Parameter groups, each with a ``name``, from the roles the memory parts declare:

    * ``decay``: matrices (dim >= 2) other than values and keys, at ``lr`` with ``weight_decay``;
    * ``no_decay``: biases and norm gains, at ``lr``;
    * ``subkeys``: addressing keys (product-key and Tucker tables), at ``lr``, no decay;
    * ``values``: value tables, at ``value_lr`` (default ``value_lr_ratio * lr``), no decay; stores with
      an lr decay (UltraMem) get their own ``values`` group at ``value_lr / start`` carrying ``lr_decay =
      (start, fraction)``: the trainer scales it by ``lr_decay_scale``, so it starts at ``value_lr`` and
      falls to ``value_lr / start`` (with the default ratio 10 and start 10: UltraMem's 10x -> 1x lr).

    Empty groups are left out.
    """
    check_pools_registered(model)
    roles = parameter_roles(model)
    values, subkeys = roles["values"], roles["keys"]
    special = {id(p) for p in values + subkeys}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    value_lr = value_lr if value_lr is not None else value_lr_ratio * lr
    by_decay: dict = {}
    for store in value_stores(model):
        for p in store.param_roles().get("values", []):
            by_decay.setdefault(store.lr_decay, []).append(p)
    value_groups = [  # a decaying store peaks at value_lr and falls to value_lr / start (UltraMem: 10x -> 1x lr)
        dict(name="values", params=[p for p in _unique(ps) if p.requires_grad], lr=value_lr, weight_decay=0.0)
        | ({} if decay is None else {"lr": value_lr / decay[0], "lr_decay": decay})
        for decay, ps in by_decay.items()
    ]
    grouped = {id(p) for g in value_groups for p in g["params"]}
    orphans = [p for p in values if p.requires_grad and id(p) not in grouped]  # values of parts that are not stores
    if orphans:
        value_groups.insert(0, dict(name="values", params=orphans, lr=value_lr, weight_decay=0.0))
    groups = [
        dict(name="decay", params=[p for p in rest if p.dim() >= 2], lr=lr, weight_decay=weight_decay),
        dict(name="no_decay", params=[p for p in rest if p.dim() < 2], lr=lr, weight_decay=0.0),
        dict(name="subkeys", params=[p for p in subkeys if p.requires_grad], lr=lr, weight_decay=0.0),
        *value_groups,
    ]
    return [g for g in groups if g["params"]]


def row_sparse_grad(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (U,), grads (U, d))`` of ``p.grad``, a row-sparse COO gradient, with unique sorted rows.

    The bag's backward hands autograd a coalesced gradient (sorted unique rows), but autograd's
    gradient accumulation rebuilds it without the flag, and ``coalesce()`` on a (U, d) gradient is
    a sort plus a full copy (on an H200, most of the ~2 ms of a 5.1 ms Adam step at 0.9M x 1024
    bf16 rows that was not the update kernel). So: rows already strictly
    increasing (one cheap check) are marked coalesced in place; otherwise (gradients summed over
    several backward passes, or a pool read by several layers) the gradient is coalesced and stored
    back in ``p.grad``.
    """
    grad = p.grad
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if grad.sparse_dim() == 1 and (rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all())):
            grad._coalesced_(True)
        else:
            p.grad = grad = grad.coalesce()
    return grad._indices()[0], grad._values()


class RowSparseOptimizer(torch.optim.Optimizer):
    """Base of the row-sparse optimizers: each step updates only the rows present in each
    parameter's row-sparse gradient (and their state); untouched rows stay bit-identical and a
    step costs O(rows touched), not O(N).

    Subclasses set ``STATE`` (name -> "table" for an (N, d) tensor like the parameter, "per_row" for
    an (N,) fp32 accumulator) and implement ``_update``. ``impl`` ("auto", "reference" or
    "triton") picks the path of the ``memlayers.ops.row_update`` function doing the update: on CUDA
    one fused Triton kernel, elsewhere the chunked ``index_select`` / ``index_copy_`` reference.
    """

    STATE: ClassVar[dict[str, str]] = {}

    def __init__(self, params, defaults: dict, impl: str = "auto"):
        if impl not in ROW_UPDATE_IMPLS:
            raise ValueError(f"{type(self).__name__}: impl must be one of {ROW_UPDATE_IMPLS}, got {impl!r}")
        super().__init__(params, defaults)
        self.impl = impl

    def _update(self, p, rows, grads, group: dict, state: dict) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)  # casts floating state to each parameter's dtype...
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in enumerate(params):  # ...but per-row accumulators stay fp32 (a bf16 sum stops growing)
            for name, kind in self.STATE.items():
                if kind == "per_row" and name in saved.get(i, {}):
                    self.state[p][name] = saved[i][name].to(device=p.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} needs row-sparse gradients: build the value tables with "
                        "sparse_grad=True (MemoryConfig(sparse_values=True)), or use AdamW for dense gradients"
                    )
                rows, grads = row_sparse_grad(p)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for name, kind in self.STATE.items():
                        state[name] = (
                            torch.zeros_like(p, memory_format=torch.preserve_format)
                            if kind == "table"
                            else torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                        )
                state["step"] += 1
                self._update(p, rows, grads, group, state)
        return loss


class SparseRowAdam(RowSparseOptimizer):
    """Lazy Adam for row-sparse gradients: only the rows present in the gradient, and their
    moments, change.

    The update is ``torch.optim.SparseAdam``'s (bias correction from the global step count, eps
    added after the square root; tested equal), in fp32 arithmetic (``row_adam_update``: on CUDA
    one fused kernel reads g, m, v, p once and writes m, v, p once). Moments are kept in the
    parameter's dtype, as SparseAdam does: 2 x N x d of optimizer state. No weight decay.
    """

    STATE: ClassVar[dict[str, str]] = {"exp_avg": "table", "exp_avg_sq": "table"}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, *, impl: str = "auto"):
        if not lr > 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"SparseRowAdam: need lr > 0, eps > 0 and betas in [0, 1), got {lr}, {eps}, {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps), impl)

    def _update(self, p, rows, grads, group, state):
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        row_adam_update(p, m, v, rows, grads, group["lr"], beta1, beta2, group["eps"], state["step"], impl=self.impl)


class SparseRowAdagrad(RowSparseOptimizer):
    """Row-wise Adagrad for row-sparse gradients (FBGEMM's "exact row-wise Adagrad"): one fp32
    accumulator per row, ``s += mean(g**2)``, then ``p -= lr * g / (sqrt(s) + eps)``.

    Optimizer state is N floats instead of Adam's 2 x N x d (64 MiB instead of 64 GiB for a
    16M x 1024 bf16 table), and a step moves only g and p. No weight decay.
    """

    STATE: ClassVar[dict[str, str]] = {"sum_sq": "per_row"}

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, *, impl: str = "auto"):
        if not lr > 0 or not eps > 0:
            raise ValueError(f"SparseRowAdagrad: need lr > 0 and eps > 0, got {lr}, {eps}")
        super().__init__(params, dict(lr=lr, eps=eps), impl)

    def _update(self, p, rows, grads, group, state):
        row_adagrad_update(p, state["sum_sq"], rows, grads, group["lr"], group["eps"], impl=self.impl)


class SparseRowSGD(RowSparseOptimizer):
    """Plain SGD on the touched rows, ``p -= lr * g`` (fp32 arithmetic, no state, no momentum).

    Gradients of value rows are small (each row gets a softmax-weighted share of one token's
    gradient), so SGD needs a much larger learning rate than the Adam-style optimizers.
    """

    def __init__(self, params, lr: float = 1e-1, *, impl: str = "auto"):
        if not lr > 0:
            raise ValueError(f"SparseRowSGD: need lr > 0, got {lr}")
        super().__init__(params, dict(lr=lr), impl)

    def _update(self, p, rows, grads, group, state):
        row_sgd_update(p, rows, grads, group["lr"], impl=self.impl)


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
    value_lr_ratio: float | None = None,
    value_optimizer: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW over ``param_groups(model, ...)`` (fused kernels: no full-size temporaries).

    ``value_optimizer`` picks what updates the value tables: "adamw" (with the rest), or a
    row-sparse optimizer that touches only the rows a step read: "sparse_adam" (``SparseRowAdam``,
    same betas/eps), "sparse_adagrad" (``SparseRowAdagrad``, eps) or "sparse_sgd"
    (``SparseRowSGD``). The sparse ones need ``sparse_grad=True`` tables, i.e. layers built with
    ``MemoryConfig(sparse_values=True)``, and return a ``CombinedOptimizer``.

    The values learn at ``value_lr``, else ``value_lr_ratio * lr``, where ``value_lr_ratio=None``
    takes ``VALUE_LR_RATIOS[value_optimizer]`` (10 for the Adam variants; far more for Adagrad and SGD).
    """
    if value_optimizer not in VALUE_OPTIMIZERS:
        raise ValueError(f"value_optimizer must be one of {VALUE_OPTIMIZERS}, got {value_optimizer!r}")
    tables = [s for s in value_stores(model) if s.param_roles().get("values")]
    sparse = [t for t in tables if t.sparse_grad]
    if value_optimizer != "adamw" and len(sparse) != len(tables):
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
        if value_optimizer == "sparse_adam":
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


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    norms = []
    for p in params:
        if p.grad.is_sparse:  # rows read by several layers of a shared pool must be summed first
            norms.append(torch.linalg.vector_norm(row_sparse_grad(p)[1].float()))
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
            for p in part:  # a sparse gradient's values in place: mul_ on it would drop its coalesced flag
                (p.grad._values() if p.grad.is_sparse else p.grad).mul_(scale.to(p.grad.dtype))
        out.append(norm)
    return tuple(out)
