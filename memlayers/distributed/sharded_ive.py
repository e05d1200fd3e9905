"""UltraMem's implicit value expansion sharded over a memory group: its physical table V split by columns or
by rows, the projection W and the permutation whole on every rank (W is a dense parameter: FSDP2's)."""

import math

import torch
import torch.distributed as dist
from torch import nn

from ..memory.stores import ImplicitValueExpansion
from ..memory.stores.ive import RowSlices, pool
from ..ops import embedding_bag
from .collectives import all_gather_rows, all_to_all_rows, send_to_owners
from .sharded_table import ShardedStore, row_block


class ShardedIVE(ShardedStore):
    """What both shardings share: the store's options, the local part ``weight`` of V (role "values"), the whole
    ``proj`` W (role "dense") and ``perm``. ``forward(ids (T, H, k), weights (T, H, k[, C]), x) -> (T, out_dim)``
    is the whole store's: the subclass's collective ``pooled`` (T, E, d_v), then the projection."""

    def __init__(self, store: ImplicitValueExpansion, group, shard: torch.Tensor):
        super().__init__(group)
        self._copy_options(store)
        self.weight = nn.Parameter(shard.detach().clone())
        self.proj = nn.Parameter(store.proj.detach().clone())
        self.register_buffer("perm", store.perm.clone())

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"values": [self.weight], "dense": [self.proj]}

    def pooled(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(ids)
        return self.kind.forward(self, ids, weights)  # the store's projection of our ``pooled``


class ColumnShardedIVE(ShardedIVE):
    """Rank r of the G in ``group`` holds columns ``[r*d_v/G, (r+1)*d_v/G)`` of every physical row.

    ``pooled``: all-gather the group's ids and weights, pool the local columns of every token of the group
    ((G*T, E, d_v/G)), all-to-all the slices back to their tokens' ranks. With C cores (each a d_v/C wide slice of
    a row, weighted apart), the local columns are cut into slices of gcd(d_v/G, d_v/C) columns, each weighted by
    its core's weight. Per token and rank: (G-1) * L * (8 + C*w) bytes of ids and weights, (G-1)/G * E * d_v * v
    of pooled slices (then the E*d_v -> out_dim projection runs on the token's own rank).
    """

    def __init__(self, store: ImplicitValueExpansion, group: dist.ProcessGroup | None = None):
        G, r = self._check(store, group, ImplicitValueExpansion)
        if store.value_dim % G:
            raise ValueError(
                f"ColumnShardedIVE: the values' width {store.value_dim} does not split into {G} equal column slices; "
                f"use a memory group whose size divides {store.value_dim}"
            )
        width, core_width = store.value_dim // G, store.value_dim // store.cores
        piece = math.gcd(width, core_width)
        self.columns = (r * width, (r + 1) * width)
        super().__init__(store, group, store.weight[:, r * width : (r + 1) * width])
        # the core of each local slice of ``piece`` columns
        self.register_buffer("slice_cores", (r * width + torch.arange(width // piece) * piece) // core_width, False)

    def split(self, param: nn.Parameter | None = None) -> tuple[int, int]:
        return 1, self.value_dim

    def pooled(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, G = ids.shape[0], self.world
        w = self.kind.core_weights(self, ids, weights).expand(-1, -1, self.cores)  # (T, L, C)
        all_ids = all_gather_rows(ids.flatten(1), self.group)  # (G*T, L)
        all_w = all_gather_rows(w, self.group)[..., self.slice_cores]  # (G*T, L, local slices)
        block, row = self.kind.slots(self, all_ids)
        part = pool(self.weight, block, row, all_w, self.expansion, self.sparse_grad)  # (G*T, E, d_v/G)
        mine = all_to_all_rows(part.flatten(1), self.group)  # block i: rank i's columns of our tokens
        mine = mine.view(G, T, self.expansion, self.value_dim // G)  # no -1: T may be 0
        return mine.permute(1, 2, 0, 3).reshape(T, self.expansion, self.value_dim)

    def extra_repr(self) -> str:
        return (
            f"num_values={self.num_values} (x{self.expansion}), value_dim={self.value_dim}, columns="
            f"{self.columns[0]}:{self.columns[1]} (rank {self.rank} of {self.world}), cores={self.cores}"
        )


class RowShardedIVE(ShardedIVE):
    """Rank r of the G in ``group`` holds physical rows ``[r*R, (r+1)*R)`` (R = ceil(N/G)).

    ``pooled``: each entry (its local row, token, block and C weights) goes to the rank owning its row; the
    owner adds it into its (source rank, token, block, core) row with one keyed bag ((G*T, E, d_v) partials),
    and the partials go back to their tokens' ranks and are summed in rank order. Per token and rank:
    (G-1)/G * L * (16 + C*w) bytes of entries, (G-1) * E * d_v * v of partials (each way).
    """

    def __init__(self, store: ImplicitValueExpansion, group: dist.ProcessGroup | None = None):
        G, r = self._check(store, group, ImplicitValueExpansion)
        self.block, self.rows = row_block(type(self).__name__, store.num_values, G, r)
        super().__init__(store, group, store.weight[slice(*self.rows)])

    def split(self, param: nn.Parameter | None = None) -> tuple[int, int]:
        return 0, self.num_values

    def pooled(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, G, E, d = ids.shape[0], self.world, self.expansion, self.value_dim
        block, row = self.kind.slots(self, ids)  # (T, L) each
        w = self.kind.core_weights(self, ids, weights)  # (T, L, C)
        L, C = w.shape[1:]
        owner = torch.div(row, self.block, rounding_mode="floor").reshape(-1)
        token = torch.arange(T, device=ids.device).repeat_interleave(L)
        entries = [(row.reshape(-1) - owner * self.block), token * E + block.reshape(-1), w.reshape(-1, C)]
        source, (local, key, w) = send_to_owners(owner, entries, self.group)
        cores = torch.arange(C, device=ids.device)
        table = self.weight if C == 1 else RowSlices.apply(self.weight, C)  # (R*C, d/C): row r*C + c is slice c
        rows = (local.unsqueeze(1) * C + cores).view(1, -1)  # every entry's C slices, as one keyed bag
        bags = ((source * T * E + key).unsqueeze(1) * C + cores).view(1, -1)  # (source, token, block, core)
        part = embedding_bag(
            table, rows, w.reshape(1, -1), sparse_grad=self.sparse_grad, bags=bags, num_bags=G * T * E * C
        )  # (G*T*E*C, d/C): block s holds our rows' part of rank s's tokens
        mine = all_to_all_rows(part.view(G * T, E * d), self.group)
        return mine.view(G, T, E, d).sum(0)

    def extra_repr(self) -> str:
        return (
            f"num_values={self.num_values} (x{self.expansion}), value_dim={self.value_dim}, rows="
            f"{self.rows[0]}:{self.rows[1]} (rank {self.rank} of {self.world}), cores={self.cores}"
        )


IVE_SHARDINGS = {"column": ColumnShardedIVE, "row": RowShardedIVE}
