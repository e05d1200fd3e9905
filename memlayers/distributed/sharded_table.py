"""A value table sharded over a process group (a "memory group"), read by the group as the whole table:
by columns (the paper's memory parallelism) or by rows (as torchrec and the 2026 n-gram-memory trainers).

Per token and rank, with L = H*k entries of 8-byte ids and w-byte weights, rows of d values of v bytes and
G ranks, a training step sends (measured to match by ``benchmarks/distributed.py``):

* by columns: forward (G-1) * L * (8 + w) of ids and weights (all-gathered) + (G-1)/G * d * v of output;
  backward (G-1) * L * w of weight gradients + (G-1)/G * d * v of output gradient;
* by rows: forward (G-1)/G * L * (16 + w) of ids, token positions and weights (routed to the rows' owners)
  + (G-1) * d * v of partial outputs (one from every owner); backward (G-1)/G * L * w + (G-1) * d * v.

Columns move less when L * (G(8 + 2w) - (16 + 2w)) < 2 * d * v * (G - 1); for large G, when
L * (8 + 2w) < 2 * d * v (the paper's 128 entries per token of rows of 1,024 bf16 values: 1,536 < 4,096);
rows move less for many narrow reads. Both keep each rank's value gradient local and exact (its own
columns, or rows, from every token of the group).
"""

import math

import torch
import torch.distributed as dist
from torch import nn

from ..memory.parts import ValueStore
from ..memory.stores import ValueTable
from ..ops import embedding_bag
from .collectives import all_gather_rows, all_to_all_rows, send_to_owners


def row_block(name: str, rows: int, G: int, r: int) -> tuple[int, tuple[int, int]]:
    """(R, (first, end)): rank r of G holds rows [r*R, (r+1)*R) of ``rows``, R = ceil(rows/G) (``torch.chunk``'s
    split, the last block may be short). Raises when a rank would hold none."""
    R = math.ceil(rows / G)
    if (G - 1) * R >= rows:
        raise ValueError(
            f"{name}: {rows} rows in blocks of {R} leave a rank of the {G} without rows; use a smaller memory group"
        )
    return R, (r * R, min((r + 1) * R, rows))


class ShardedStore(ValueStore):
    """A value store whose parameters are split over the ranks of ``group`` (a memory group), read by the
    group as the whole store: every rank calls forward with the same number of tokens (checked) and runs
    the backward (both collective). ``split`` says how each parameter is split (sharded checkpoints use it);
    ``part`` and ``gather`` map tensors laid out like a parameter (it, or its optimizer state) to this rank's
    part and back (a one-file checkpoint resumed on many processes, ``full_weight``). Accounting and
    signature are the whole store's (``kind``, set by ``_copy_options``).
    """

    def __init__(self, group: dist.ProcessGroup | None):
        super().__init__()
        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)

    @classmethod
    def _check(cls, store, group, kind=None) -> tuple[int, int]:
        name = cls.__name__
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{name}: torch.distributed is not initialised; launch with torchrun and call "
                "torch.distributed.init_process_group first"
            )
        kind = kind or ValueTable
        if not isinstance(store, kind):
            raise TypeError(f"{name}: table must be a memlayers {kind.__name__}, got {type(store).__name__}")
        return dist.get_world_size(group), dist.get_rank(group)

    def _copy_options(self, store: ValueStore) -> None:
        """The store's sizes and options (num_values, dim, out_dim, heads, activation, lr_decay, ...)."""
        self.kind = type(store)  # whose forward, accounting and signature a shard may keep
        for name, value in vars(store).items():
            if (
                not name.startswith("_")
                and name != "training"
                and isinstance(value, (int, float, str, tuple, type(None)))
            ):
                setattr(self, name, value)

    def read_params(self, reads: int) -> int:
        return self.kind.read_params(self, reads)

    def read_flops(self, reads: int) -> int:
        """The whole store's: the group shares the work."""
        return self.kind.read_flops(self, reads)

    def signature(self) -> dict:
        return self.kind.signature(self)

    def split(self, param: nn.Parameter) -> tuple[int, int]:
        """(dimension, whole size): ``param`` is its whole split along that dimension in ``torch.chunk``'s way
        (DTensor's ``Shard``), rank r holding chunk r; so is its optimizer state where it has that dimension."""
        raise NotImplementedError

    def part(self, whole: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """This rank's part of a tensor laid out like ``param``'s whole (the parameter, or its optimizer state)."""
        dim, _ = self.split(param)
        if whole.dim() <= dim:
            raise ValueError(
                f"{type(self).__name__}: a per-row tensor (e.g. row-wise Adagrad's state) has no column slices; shard "
                "by rows for such an optimizer"
            )
        return whole.chunk(self.world, dim)[self.rank]

    @torch.no_grad()
    def gather(self, part: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """The whole tensor from every rank's ``part`` of it (the inverse of ``part``; collective)."""
        dim, size = self.split(param)
        part = part.movedim(dim, 0)
        padded = part.new_zeros(-(-size // self.world), *part.shape[1:])  # the last chunk may be short
        padded[: part.shape[0]] = part
        return all_gather_rows(padded, self.group)[:size].movedim(0, dim)

    def _check_inputs(self, ids: torch.Tensor) -> None:
        """Every rank learns every rank's token count and whether its ids are in range, and all raise
        together (one rank raising alone would leave the others waiting in a collective)."""
        bad = ((ids < 0) | (ids >= self.num_slots)).any()
        seen = all_gather_rows(torch.stack([torch.tensor(ids.shape[0], device=ids.device), bad.long()]), self.group)
        counts, bad = seen[0::2].tolist(), seen[1::2].tolist()
        if any(bad):
            raise IndexError(
                f"{type(self).__name__}: ids outside [0, {self.num_slots}) on rank(s) "
                f"{[r for r, b in enumerate(bad) if b]} of the memory group"
            )
        if len(set(counts)) > 1:
            raise ValueError(
                f"{type(self).__name__}: the ranks of the memory group read {counts} tokens in this call; "
                "every rank must read the same number (the same batch size and sequence length)"
            )


class ShardedTable(ShardedStore):
    """What both shardings of a ``ValueTable`` share: the table's sizes and options, the local shard ``weight``
    (role "values"). ``bag(ids (T, L), weights (T, L)) -> (T, d)`` is the collective bag of the subclasses;
    the table's own ``forward`` and accounting run on it (a ``ValueTable`` sums its heads' rows, an engram
    ``ConcatTable`` sets them side by side). The fused update works on the shard: its local bag hands the
    backward's pieces to the sink (``Parallel.reduce_value_grads`` gathers them from the shard's replicas).
    """

    def __init__(self, table: ValueTable, group: dist.ProcessGroup | None, shard: torch.Tensor):
        super().__init__(group)
        self._copy_options(table)
        self.value_grad_sink = None
        self.weight = nn.Parameter(shard.detach().clone())

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"values": [self.weight]}

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.kind.forward(self, ids, weights, x)

    def set_value_grad_sink(self, param: nn.Parameter, sink) -> None:
        self.kind.set_value_grad_sink(self, param, sink)

    def bag(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The whole (N, d) table, gathered from the group (collective)."""
        return self.gather(self.weight.detach(), self.weight)


class ColumnShardedTable(ShardedTable):
    """Rank r of the G in ``group`` holds columns ``[r*d/G, (r+1)*d/G)`` of every row.

    ``bag(ids (T, L), weights (T, L)) -> (T, d)``, the table's: all-gather the group's ids and
    weights ((G*T, H*k) each), bag the local columns for every token of the group ((G*T, d/G)), all-to-all
    the slices back to their tokens' ranks. Backward: the same way back; each token's weight gradient is the
    sum over ranks of their columns' (an all-to-all and a sum).

    Args:
        table: the whole table, the same on every rank (e.g. built from one seed); each rank keeps a copy of
            its columns. Its ``sparse_grad``, ``lr_decay`` and ``init_std`` carry over.
        group: the memory group (None: the default group).
    """

    def __init__(self, table: ValueTable, group: dist.ProcessGroup | None = None):
        G, r = self._check(table, group)
        if table.dim % G:
            raise ValueError(
                f"ColumnShardedTable: the table's width {table.dim} does not split into {G} equal column slices; "
                f"use a memory group whose size divides {table.dim}"
            )
        width = table.dim // G
        self.columns = (r * width, (r + 1) * width)
        super().__init__(table, group, table.weight[:, r * width : (r + 1) * width])  # (N, d/G)

    def bag(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, G = ids.shape[0], self.world
        self._check_inputs(ids)
        all_ids = all_gather_rows(ids.flatten(1), self.group)  # (G*T, L)
        all_weights = all_gather_rows(weights.flatten(1), self.group)
        part = embedding_bag(
            self.weight, all_ids, all_weights, sparse_grad=self.sparse_grad, value_grad_sink=self.value_grad_sink
        )  # (G*T, d/G)
        mine = all_to_all_rows(part, self.group)  # (G*T, d/G): block i holds rank i's columns of our tokens
        return mine.view(G, T, self.dim // G).transpose(0, 1).reshape(T, self.dim)  # no -1: T may be 0

    def split(self, param: nn.Parameter | None = None) -> tuple[int, int]:
        return 1, self.dim

    def extra_repr(self) -> str:
        return (
            f"num_values={self.num_values}, dim={self.dim}, columns={self.columns[0]}:{self.columns[1]} "
            f"(rank {self.rank} of {self.world}), sparse_grad={self.sparse_grad}"
        )


class RowShardedTable(ShardedTable):
    """Rank r of the G in ``group`` holds rows ``[r*R, (r+1)*R)`` (R = ceil(N/G); the last rank's block may
    be shorter).

    ``bag(ids (T, L), weights (T, L)) -> (T, d)``, the table's: each entry (id, weight, token)
    is sent to the rank owning its row (an all-to-all of the counts, then of the entries), each owner bags
    its rows into one partial output per token of the group ((G*T, d)), the partials go back to their
    tokens' ranks and are summed in rank order. Backward: the same way back. Two host syncs per call (the
    counts), as torchrec's row-wise sharding has.

    Args: as ``ColumnShardedTable``'s.
    """

    def __init__(self, table: ValueTable, group: dist.ProcessGroup | None = None):
        G, r = self._check(table, group)
        self.block, self.rows = row_block(type(self).__name__, table.num_values, G, r)
        super().__init__(table, group, table.weight[slice(*self.rows)])  # (rows, d)

    def bag(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, G, L = ids.shape[0], self.world, ids.shape[1:].numel()
        self._check_inputs(ids)
        ids, weights = ids.reshape(-1), weights.reshape(-1)  # (T*L,)
        owner = torch.div(ids, self.block, rounding_mode="floor")
        token = torch.div(torch.arange(ids.numel(), device=ids.device), L, rounding_mode="floor")
        source, (local, token, w) = send_to_owners(owner, [ids - owner * self.block, token, weights], self.group)
        if local.numel() == 0:  # no entry reads our rows: zero partials (kept in the graph: the backward is collective)
            part = self.weight.new_zeros(G * T, self.dim) + 0 * w.sum().to(self.weight.dtype)
        else:
            # Bag b = s*T + t holds what rank s sent for its token t, each entry at its place in the bag.
            bag = source * T + token  # (E,) ascending: sources in rank order, each one's entries in token order
            first = torch.searchsorted(bag, bag, side="left")  # each entry's bag's first entry
            slot = torch.arange(bag.numel(), device=ids.device) - first
            width = int(slot.max()) + 1
            # empty places read, at weight 0, a row their bag reads anyway (or, in an empty bag, the first entry's
            # row): no row is touched that no entry reads, so row-sparse gradients and optimizers see the same rows
            bag_ids = local[:1].repeat(G * T, width)
            bag_ids[bag] = local[first].unsqueeze(1)
            bag_ids.view(-1)[bag * width + slot] = local
            bag_w = w.new_zeros(G * T * width).index_put((bag * width + slot,), w).view(G * T, width)
            part = embedding_bag(
                self.weight, bag_ids, bag_w, sparse_grad=self.sparse_grad, value_grad_sink=self.value_grad_sink
            )
            # (G*T, d): block s holds our rows' part of rank s's tokens
        return all_to_all_rows(part, self.group).view(G, T, self.dim).sum(0)

    def split(self, param: nn.Parameter | None = None) -> tuple[int, int]:
        return 0, self.num_values

    def extra_repr(self) -> str:
        return (
            f"num_values={self.num_values}, dim={self.dim}, rows={self.rows[0]}:{self.rows[1]} "
            f"(rank {self.rank} of {self.world}), sparse_grad={self.sparse_grad}"
        )


SHARDINGS = {"column": ColumnShardedTable, "row": RowShardedTable}
