"""Sparse memory finetuning (Lin et al., "Continual Learning via Sparse Memory Finetuning", arXiv 2510.15103):
learn new facts by updating only the memory rows that the new data reads far more often than the
background (pretraining) data does; every other parameter stays frozen.

    background = record_background(model, pretraining_batches)   # once, after pretraining
    smf = SparseMemoryFinetuning(model, background, top_t=500)
    optimizer = smf.optimizer(lr=1.0)                             # plain SGD on the selected rows
    for x, y in new_data:
        loss = model(x, targets=y).loss
        loss.backward()
        smf.select_rows()          # keep only the top-t TF-IDF rows' gradients (after backward, before step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    smf.close()                    # hooks off, requires_grad as it was

Ranking (per value store, i.e. per shared pool or per layer's own table): a row's term frequency ``tf`` is
how many times real (unmasked) tokens read it since the last ``select_rows`` (every micro-batch of the step,
every layer reading the store); its inverse document frequency is ``idf = log((1 + D) / (1 + df))``, where
``df`` is the number of the ``D`` background batches in which the row was read. The step updates the
``top_t`` rows of largest ``tf * idf > 0``: a row read in every background batch (idf 0) is never updated.
Ties go to the lower row id. ``top_t=None`` updates every row the step read (memory-only finetuning).

The selection is exact by construction: ``select_rows`` turns each value table's gradient into a row-sparse
gradient holding the selected rows only, and the row-sparse optimizers (``smf.optimizer``: SGD, lazy Adam
or row-wise Adagrad) update exactly the rows present. (A dense optimizer with momentum or weight decay
would move the other rows too: use ``smf.optimizer``.) One process only.
"""

import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .memory.layer import MemoryLayer
from .memory.parts import ValueStore
from .optim.groups import check_pools_registered
from .optim.row_sparse import RowSparseOptimizer, SparseRowAdagrad, SparseRowAdam, SparseRowSGD

RULES = {"sgd": SparseRowSGD, "adam": SparseRowAdam, "adagrad": SparseRowAdagrad}


def memory_tables(model: nn.Module) -> dict[str, tuple[ValueStore, list[nn.Parameter]]]:
    """{module name of each value store the model's memory layers read: (the store, its "values" tables)}, a
    shared pool once. Every table of a store has one row per ``store.rows`` id: shape (rows, ...)."""
    check_pools_registered(model)
    names = {id(m): name for name, m in model.named_modules()}
    out: dict = {}
    for layer in (m for m in model.modules() if isinstance(m, MemoryLayer)):
        store = layer.store.root()
        name = names[id(store)]
        if name in out:
            continue
        tables = store.param_roles().get("values", [])
        if not tables or len({t.shape[0] for t in tables}) != 1:
            raise ValueError(
                f"{type(store).__name__} {name!r} has no value tables with one row per slot, which sparse memory "
                "finetuning updates; use a memory kind with value tables (memory, memory_plus, pkm, peer, ...)"
            )
        out[name] = (store, tables)
    if not out:
        raise ValueError("the model has no memory layers: sparse memory finetuning updates memory value rows")
    return out


class SlotCounter:
    """How often each row of each value store of ``model`` is read by real (unmasked) tokens: forward hooks
    on every memory layer's addressing. ``take()`` returns {store name: (rows,) int64 counts} accumulated
    since the last take (stores not read: absent) and starts over. ``training_only``: count only forward
    passes in training mode (evaluations in between do not count). A context manager; ``close()`` removes
    the hooks."""

    def __init__(self, model: nn.Module, training_only: bool = False):
        self.tables = memory_tables(model)
        self.training_only = training_only
        self.counts: dict[str, torch.Tensor] = {}
        names = {id(m): name for name, m in model.named_modules()}
        self._handles = [
            layer.addressing.register_forward_hook(self._hook(layer, names[id(layer.store.root())]))
            for layer in model.modules()
            if isinstance(layer, MemoryLayer)
        ]

    def _hook(self, layer: MemoryLayer, name: str):
        rows = self.tables[name][1][0].shape[0]

        def hook(addressing, args, output):
            if self.training_only and not addressing.training:
                return
            read = layer.store.rows(output[0])  # (T, H, k) rows of the store's tables
            mask = args[1] if len(args) > 1 else None  # (T,) bool: real tokens
            read = (read if mask is None else read[mask]).reshape(-1)
            if name not in self.counts:
                self.counts[name] = torch.zeros(rows, dtype=torch.int64, device=read.device)
            self.counts[name].index_add_(0, read, torch.ones_like(read))

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        counts, self.counts = self.counts, {}
        return counts

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "SlotCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Background:
    """Row usage on background (pretraining) data: ``docs`` batches, and per value store (by module name) the
    number of those batches in which each row was read, ``df[name]`` (rows,) int64."""

    docs: int
    df: dict[str, torch.Tensor]

    def idf(self, name: str) -> torch.Tensor:
        """(rows,) float64 ``log((1 + docs) / (1 + df))``: 0 for a row read in every background batch."""
        return torch.log((1.0 + self.docs) / (1.0 + self.df[name].double()))

    def save(self, path) -> None:
        torch.save({"docs": self.docs, "df": {k: v.cpu() for k, v in self.df.items()}}, path)

    @classmethod
    def load(cls, path) -> "Background":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return cls(int(state["docs"]), {str(k): v.long() for k, v in state["df"].items()})
        except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a background file written by Background.save ({e})") from None


@torch.no_grad()
def record_background(model: nn.Module, batches, forward=None) -> Background:
    """Run ``model`` (in eval mode, without gradients) over ``batches`` (each one background "document") and
    count, per row of each value store, in how many batches it was read. ``forward(model, batch)`` runs one
    batch; default ``model(batch)``, ``model(batch[0])`` for a tuple or list (inputs first), ``model(**batch)``
    for a dict."""
    forward = forward or _forward
    was_training = model.training
    model.eval()
    docs, df = 0, {}
    try:
        with SlotCounter(model) as counter:
            for batch in batches:
                forward(model, batch)
                for name, counts in counter.take().items():
                    df[name] = df.get(name, 0) + (counts > 0).long()
                docs += 1
            missing = [name for name in counter.tables if name not in df]
            for name in missing:  # a store no batch read
                df[name] = torch.zeros(counter.tables[name][1][0].shape[0], dtype=torch.int64)
    finally:
        model.train(was_training)
    if docs == 0:
        raise ValueError("record_background: no batches; pass some batches of the pretraining data")
    return Background(docs, {k: v.cpu() for k, v in df.items()})


def _forward(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


class SparseMemoryFinetuning:
    """Freeze ``model`` but its memory value tables, and after each backward keep only the gradients of the
    ``top_t`` rows per value store ranked by TF-IDF against ``background`` (see the module docstring);
    ``top_t=None`` keeps every row the step read (memory-only finetuning; ``background`` may be None).

    parameters(): the value tables (what trains). optimizer(lr, rule): a row-sparse optimizer over them.
    select_rows(): call after the backward (all micro-batches) and before the optimizer step; it also puts back
    the statistics that training-mode forwards update (query BatchNorm, whitening: every persistent buffer), so
    the model's state changes only in the selected rows.
    close(): remove the hooks and restore every parameter's ``requires_grad``. A context manager.

    Reads are counted per forward, so gradient checkpointing (which runs the forward again) counts each read
    twice: the ranking is the same. A fused value update (``fused_values``) is detached from the tables: build
    the optimizer again after ``close()`` to train with it.
    """

    def __init__(self, model: nn.Module, background: Background | None, top_t: int | None):
        if top_t is not None and (not isinstance(top_t, int) or isinstance(top_t, bool) or top_t < 1):
            raise ValueError(
                f"SparseMemoryFinetuning: top_t must be an int >= 1 (rows per step) or None, got {top_t!r}"
            )
        if top_t is not None and background is None:
            raise ValueError(
                "SparseMemoryFinetuning: top_t needs the background counts (record_background on pretraining data); "
                "top_t=None updates every row read, without them"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("SparseMemoryFinetuning: runs in one process (the ranks' selections are not merged)")
        self.tables = memory_tables(model)
        self.top_t = top_t
        self.idf = {}
        if top_t is not None:
            for name, (_, tables) in self.tables.items():
                rows = tables[0].shape[0]
                if name not in background.df or background.df[name].shape != (rows,):
                    raise ValueError(
                        f"SparseMemoryFinetuning: the background counts have no {rows} rows for value store {name!r} "
                        f"(they have {sorted(background.df)}); record them on this model with record_background"
                    )
                self.idf[name] = background.idf(name).to(tables[0].device)
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        # statistics that training-mode forwards update (query BatchNorm, whitening): restored after every step
        self._buffers = [(b, b.detach().clone()) for _, b in _persistent_buffers(model)]
        trained = {id(t) for _, tables in self.tables.values() for t in tables}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        for store, tables in self.tables.values():  # a fused update inside the backward would skip the selection
            for table in tables:
                store.set_value_grad_sink(table, None)
        self.counter = SlotCounter(model, training_only=True)

    def parameters(self) -> list[nn.Parameter]:
        return [t for _, tables in self.tables.values() for t in tables]

    def optimizer(self, lr: float, rule: str = "sgd", **kwargs) -> RowSparseOptimizer:
        """A row-sparse optimizer over the value tables: rule "sgd" (``SparseRowSGD``, what Lin et al. found
        best), "adam" (``SparseRowAdam``, lazy) or "adagrad" (``SparseRowAdagrad``); kwargs go to it."""
        if rule not in RULES:
            raise ValueError(f"SparseMemoryFinetuning.optimizer: rule must be one of {tuple(RULES)}, got {rule!r}")
        return RULES[rule](self.parameters(), lr=lr, **kwargs)

    @torch.no_grad()
    def select_rows(self) -> dict[str, torch.Tensor]:
        """Rank the rows read since the last call, and replace each value table's gradient by a row-sparse one
        holding only the selected rows. Returns {store name: selected rows (sorted) int64}."""
        counts = self.counter.take()
        if not counts and any(t.grad is not None for _, tables in self.tables.values() for t in tables):
            raise RuntimeError(
                "SparseMemoryFinetuning.select_rows: the value tables have gradients but no training-mode forward "
                "was counted since the last call; run the finetuning forwards in training mode (model.train())"
            )
        for buffer, saved in self._buffers:
            buffer.copy_(saved)
        selected = {}
        for name, (_, tables) in self.tables.items():
            tf = counts.get(name)
            if tf is None:
                rows = torch.zeros(0, dtype=torch.int64, device=tables[0].device)
            else:
                score = tf.double() * self.idf[name] if self.top_t is not None else tf.double()
                order = torch.sort(score, descending=True, stable=True).indices[: self.top_t]
                rows = order[score[order] > 0].sort().values
            for table in tables:
                if table.grad is not None:
                    table.grad = _keep_rows(table.grad, rows)
            selected[name] = rows
        return selected

    def close(self) -> None:
        self.counter.close()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def __enter__(self) -> "SparseMemoryFinetuning":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _persistent_buffers(model: nn.Module):
    """(name, buffer) of every buffer saved in ``model``'s state_dict."""
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}", buffer


def _keep_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad (rows, ...) dense or row-sparse -> a coalesced row-sparse gradient of the given sorted ``rows`` only."""
    if grad.is_sparse:
        grad = grad.coalesce()
        present = grad.indices()[0]
        keep = torch.isin(present, rows)
        indices, values = present[keep], grad.values()[keep]
    else:
        indices, values = rows, grad[rows]
    return torch.sparse_coo_tensor(indices.unsqueeze(0), values, grad.shape, is_coalesced=True, check_invariants=False)


__all__ = ["Background", "SlotCounter", "SparseMemoryFinetuning", "memory_tables", "record_background"]
