"""The value update inside the backward: FBGEMM's fused optimizer, for the memory value tables.

With ``build_optimizer(..., value_optimizer="sparse_adam" | "sparse_adagrad" | "sparse_sgd", fused_values=True)``
the value tables never get a gradient. Each read of a table hands its backward's inputs, the bag's
``(ids, weights, grad_out)``, to this optimizer; once autograd has run every reader of the table in a
backward pass (the table's post-accumulate-grad hook), one ``memlayers.ops.bag_update`` sums each touched
row's gradient and applies the row-wise rule to it in place: no (N, d) or (U, d) gradient tensor and no
separate optimizer pass over the table. The math is the unfused optimizers' (``SparseRowAdam``,
``SparseRowAdagrad``, ``SparseRowSGD``; tested equal).

* Shared pools: autograd runs the hook once per backward pass, after all of the pool's readers, so the pool
  is updated once per step with every reader's contribution, as the unfused path does.
* Micro-batches: inside ``accumulate()`` backward passes only collect their pieces; everything collected is
  applied together (the summed gradient, exactly) at the next backward outside it, or at ``step()``.
  Pieces hold the readers' ``grad_out`` (T, d) until then: memory like one activation per reader and micro-batch.
* The learning rate (``group["lr"]``, a 0-dim tensor on the table's device: set it with ``set_lr`` or
  ``fill_``, as torch's LR schedulers do) and the step count are device tensors: no host sync, no recompile.
* Many processes: a plan gathers every replica's collected pieces (``collected`` / ``replace_collected``)
  and ``step()`` applies them; the backward passes then run inside ``accumulate()``.
* Clipping: the value gradient is never formed, so it cannot be clipped by its norm before the update
  (``clip_grad_norms`` sees no value gradients; the trainer refuses ``value_clip`` with fused values).
  ``grad_norm()`` gives the norm of what the last updates applied.
* Each backward pass applies the update when it finishes, so a second forward whose graph still holds the
  old values must be backpropagated inside ``accumulate()`` (else autograd reports the in-place change).
"""

import contextlib
import weakref
from typing import ClassVar

import torch

from ..ops.bag_update import bag_update
from .row_sparse import RowSparseOptimizer

RULES = {"sparse_adam": "adam", "sparse_adagrad": "adagrad", "sparse_sgd": "sgd"}
STATES = {"adam": {"exp_avg": "table", "exp_avg_sq": "table"}, "adagrad": {"sum_sq": "per_row"}, "sgd": {}}


class FusedRowOptimizer(RowSparseOptimizer):
    """The row-wise ``rule`` ("adam", "adagrad" or "sgd") applied inside the backward to value tables.

    Args:
        params: the tables (or groups of them), each read by a store that supports ``set_value_grad_sink``;
            ``attach(store, param)`` (``build_optimizer`` does it) routes their reads here.
        rule, lr, betas, eps: as ``SparseRowAdam`` / ``SparseRowAdagrad`` / ``SparseRowSGD``.
        stochastic_rounding: store bfloat16 tables with unbiased stochastic rounding (bf16 tables only).
        seed: of the stochastic rounding (the bits differ per step and table).
        impl: ``memlayers.ops.bag_update``'s path: "auto", "reference" or "triton".
    """

    STATE: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        params,
        rule: str,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        *,
        stochastic_rounding: bool = False,
        seed: int = 0,
        impl: str = "auto",
    ):
        if rule not in STATES:
            raise ValueError(f"FusedRowOptimizer: rule must be one of {tuple(STATES)}, got {rule!r}")
        if not lr > 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"FusedRowOptimizer: need lr > 0, eps > 0 and betas in [0, 1), got {lr}, {eps}, {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, impl)
        self.rule, self.STATE, self.seed = rule, STATES[rule], seed
        self._pending: dict = {}  # param -> [(ids (E,), weights (E,), grad_out row (E,), grad_out (R, d))] to apply
        self._deferred = 0
        self._sq_norms: list = []  # (table, squared norm of its gradient) of this step's updates
        self._fresh = True  # no update applied since the last step()
        self._group_of, self._index = {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                if group["stochastic_rounding"] and p.dtype != torch.bfloat16:
                    raise ValueError(
                        f"FusedRowOptimizer: stochastic_rounding needs bfloat16 value tables, got {p.dtype}; "
                        "turn it off or keep the tables in bfloat16"
                    )
                self._group_of[p], self._index[p] = group, len(self._index)
            group["lr"] = _device_scalar(group["lr"], group["params"][0].device)

    def attach(self, store, param) -> None:
        """Route the reads of ``param`` (one of this optimizer's tables) by ``store`` here: only attached
        tables are updated (``build_optimizer`` attaches every one). Attaching another sink to the store, or
        None, detaches it again."""
        if param not in self._group_of:
            raise ValueError("FusedRowOptimizer.attach: the table is not one of this optimizer's parameters")
        store.set_value_grad_sink(param, ValueGradSink(self, param))

    @contextlib.contextmanager
    def accumulate(self):
        """Backward passes inside only collect their value-gradient pieces (micro-batches of one step)."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the value gradients of the last step's updates, applied in its backward or by its
        ``step()`` (a 0-dim tensor; 0 if none)."""
        squares = [sq for _, sq in self.applied()]
        if not squares:
            return torch.zeros(())
        return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()

    def applied(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(table, squared norm of its gradient) of each of the last step's updates (``grad_norm``'s parts)."""
        return list(self._sq_norms)

    @torch.no_grad()
    def step(self, closure=None):
        """Applies what ``accumulate()`` left collected (the values are otherwise updated in the backward)."""
        loss = closure() if closure is not None else None
        for p in list(self._pending):
            self._apply(p)
        if self._fresh:  # nothing applied in this step
            self._sq_norms = []
        self._fresh = True
        return loss

    def _state_of(self, p) -> dict:
        state = super()._state_of(p)
        if not torch.is_tensor(state["step"]):
            state["step"] = torch.tensor(float(state["step"]), device=p.device)
        return state

    def collected(self, p) -> tuple[torch.Tensor, ...] | None:
        """What the backward passes handed over for table ``p`` and is not applied yet, as one piece: entries'
        ids (E,), weights (E,), the row of ``grad_out`` each belongs to (E,), and ``grad_out`` (R, d); None if
        nothing. (A plan over many processes gathers it from every replica of the table: ``replace_collected``.)"""
        pieces = self._pending.get(p)
        if not pieces:
            return None
        if len(pieces) == 1:
            return pieces[0]
        offsets = [0]
        for *_, g in pieces[:-1]:
            offsets.append(offsets[-1] + g.shape[0])
        ids, weights, rows, src = zip(*pieces)
        rows = [r + o for r, o in zip(rows, offsets)]
        return torch.cat(ids), torch.cat(weights), torch.cat(rows), torch.cat(src)

    def replace_collected(self, p, ids: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, src: torch.Tensor):
        """Set what ``step()`` applies to ``p`` (``collected``'s layout; empty: the step count still moves, as a
        table some process read)."""
        self._pending[p] = [(ids, weights, rows, src)]

    @torch.no_grad()
    def _apply(self, p) -> None:
        piece = self.collected(p)
        if piece is None:
            return
        del self._pending[p]
        ids, weights, rows, src = piece
        if self._fresh:  # the first update of a step: the norms are this step's from here on
            self._sq_norms, self._fresh = [], False
        group, state = self._group_of[p], self._state_of(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        sr = group["stochastic_rounding"]
        sq_norm = bag_update(
            p, {k: state[k] for k in self.STATE}, ids, weights, rows, src, self.rule,
            lr=group["lr"], step=state["step"], beta1=beta1, beta2=beta2, eps=group["eps"],
            stochastic_rounding=sr, seed=(state["step"].long() * 1_000_003 + self.seed * 7919 + self._index[p]) if sr else None,
            impl=self.impl,
        )  # fmt: skip
        self._sq_norms.append((p, sq_norm))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # (new group dicts)
        for group in self.param_groups:  # a checkpoint holds them on the CPU, or as numbers (unfused runs)
            group["lr"] = _device_scalar(group["lr"], group["params"][0].device)
            for p in group["params"]:
                self._group_of[p] = group
                if "step" in self.state.get(p, {}):
                    self.state[p]["step"] = torch.as_tensor(self.state[p]["step"], dtype=torch.float32).to(p.device)


def _device_scalar(value, device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).detach().clone().to(device)


class ValueGradSink:
    """What a store hands a table's backward inputs to: it keeps each reader's ``(ids, weights, grad_out)``
    for ``optimizer``, and, from a post-accumulate-grad hook on the table, has them applied once every reader
    of the table in the backward pass has handed its part over. Holds the optimizer weakly, so that a dropped
    optimizer (and its state) is freed; ``close()`` (on replacement) removes the hook."""

    def __init__(self, optimizer: FusedRowOptimizer, param: torch.nn.Parameter):
        self.optimizer, self.param = weakref.ref(optimizer), param
        self.hook = param.register_post_accumulate_grad_hook(self._after_backward)

    def __call__(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor) -> None:
        optimizer = self.optimizer()
        if optimizer is None:
            raise RuntimeError(
                "a value table is attached to a fused optimizer that no longer exists, so its values would not "
                "learn: keep the optimizer, or build a new one with build_optimizer (fused_values=False restores gradients)"
            )
        rows = torch.arange(ids.numel(), device=ids.device) // max(1, ids.shape[1])  # entry (t, l) reads row t
        optimizer._pending.setdefault(self.param, []).append((ids.reshape(-1), weights.reshape(-1), rows, grad_out))

    def _after_backward(self, param) -> None:
        grad = param.grad
        if grad is not None and not (grad.is_sparse and grad._nnz() == 0):
            raise RuntimeError(
                "a value table updated inside the backward also got a real gradient (a read that bypassed the "
                "fused update, e.g. the table used directly): read it only through its store, or use fused_values=False"
            )
        param.grad = None  # the empty placeholder gradient the sink bag gives the table
        optimizer = self.optimizer()
        if optimizer is not None and not optimizer._deferred:
            optimizer._apply(param)

    def close(self) -> None:
        self.hook.remove()

    def __reduce__(self):  # a copied or pickled model is not attached to this optimizer: its table reads plainly
        return _no_sink, ()


def _no_sink() -> None:
    return None


def set_lr(group: dict, lr: float) -> None:
    """Set a parameter group's learning rate, in place when it is a tensor (a fused group's device scalar)."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr
