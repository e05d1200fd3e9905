"""Row-sparse optimizers: each step updates only the rows present in a parameter's row-sparse gradient."""

from typing import ClassVar

import torch

from ..ops.dispatch import IMPLS as ROW_UPDATE_IMPLS
from ..ops.row_update import row_adagrad_update, row_adam_update, row_sgd_update


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
                state = self._state_of(p)
                state["step"] += 1
                self._update(p, rows, grads, group, state)
        return loss

    def _state_of(self, p) -> dict:
        """``p``'s state, made on first use: "step" (0) and the ``STATE`` tensors, zeros."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            for name, kind in self.STATE.items():
                state[name] = (
                    torch.zeros_like(p, memory_format=torch.preserve_format)
                    if kind == "table"
                    else torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                )
        return state


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
