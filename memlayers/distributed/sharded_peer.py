"""PEER's experts sharded over a memory group: by columns (u's and v's columns split G ways) or by rows (each
rank holds whole experts)."""

import torch
import torch.distributed as dist
from torch import nn

from ..memory.stores import PEERExperts
from ..memory.stores.peer_experts import ACTIVATIONS
from ..ops import embedding_bag
from ..ops.gather_dot import gather_dot
from .collectives import all_gather_rows, all_reduce_sum, all_to_all_rows, send_to_owners
from .sharded_table import ShardedStore, row_block


class ColumnShardedPEER(ShardedStore):
    """Rank r of the G in ``group`` holds columns ``[r*i/G, (r+1)*i/G)`` of every expert's u (i = in_dim) and
    ``[r*o/G, (r+1)*o/G)`` of its v (o = out_dim).

    ``forward(ids (T, H, k), weights (T, H, k), x (T, in_dim)) -> (T, out_dim)``, the whole store's: all-gather
    the group's ids and weights and send each rank its column slice of every token's x (an all-to-all); each
    rank takes the dots of its u columns with those slices ((G*T, H*k) partial pre-activations) and the group
    sums them (an all-reduce), so every rank holds the whole pre-activations; each rank bags its v columns
    with the gates ``weights * act(u·x)`` for every token of the group, and an all-to-all returns the slices
    to their tokens' ranks. Backward: the same way back (autograd through the collectives). Per token and
    rank the forward sends (G-1) * L * (8 + w) of ids and weights, (G-1)/G * i * x_bytes of inputs, the
    all-reduce of G * L fp32 pre-activations (about 2 (G-1)/G * G * L * 4 with a ring) and (G-1)/G * o * v
    of output.

    Args:
        store: the whole PEERExperts, the same on every rank (from one seed). group: the memory group.
    """

    def __init__(self, store: PEERExperts, group: dist.ProcessGroup | None = None):
        G, r = self._check(store, group, PEERExperts)
        for name, width in (("in_dim", store.in_dim), ("out_dim", store.out_dim)):
            if width % G:
                raise ValueError(
                    f"ColumnShardedPEER: the experts' {name} {width} does not split into {G} equal column slices; "
                    f"use a memory group whose size divides {width}"
                )
        super().__init__(group)
        self._copy_options(store)
        self.in_columns = (r * store.in_dim // G, (r + 1) * store.in_dim // G)
        self.out_columns = (r * store.out_dim // G, (r + 1) * store.out_dim // G)
        self.u = nn.Parameter(store.u.detach()[:, slice(*self.in_columns)].clone())
        self.v = nn.Parameter(store.v.detach()[:, slice(*self.out_columns)].clone())

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"values": [self.u, self.v]}

    def split(self, param: nn.Parameter) -> tuple[int, int]:
        return 1, self.in_dim if param is self.u else self.out_dim

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if weights.shape != ids.shape:
            raise ValueError(
                f"ColumnShardedPEER: weights must have the ids' shape {tuple(ids.shape)} (one gate per expert), "
                f"got {tuple(weights.shape)}"
            )
        T, G = ids.shape[0], self.world
        in_cols, out_cols = self.in_dim // G, self.out_dim // G  # no -1 in the views: T may be 0
        self._check_inputs(ids)
        all_ids = all_gather_rows(ids.flatten(1), self.group)  # (G*T, L)
        all_weights = all_gather_rows(weights.flatten(1), self.group)
        # every token's slice of x that our u columns dot with: column block j of our x goes to rank j
        blocks = x.reshape(T, G, in_cols).transpose(0, 1).reshape(G * T, in_cols)  # (G*T, i/G)
        all_x = all_to_all_rows(blocks, self.group)  # (G*T, i/G): block s = rank s's tokens, our columns
        h = all_reduce_sum(gather_dot(self.u, all_ids, all_x, self.sparse_grad), self.group)  # (G*T, L) whole
        gates = all_weights * ACTIVATIONS[self.activation](h)
        part = embedding_bag(self.v, all_ids, gates, sparse_grad=self.sparse_grad)  # (G*T, o/G)
        mine = all_to_all_rows(part, self.group)  # block i: rank i's columns of our tokens
        return mine.view(G, T, out_cols).transpose(0, 1).reshape(T, self.out_dim)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_dim={self.in_dim}, out_dim={self.out_dim}, u columns "
            f"{self.in_columns[0]}:{self.in_columns[1]}, v columns {self.out_columns[0]}:{self.out_columns[1]} "
            f"(rank {self.rank} of {self.world}), activation={self.activation!r}, sparse_grad={self.sparse_grad}"
        )


class RowShardedPEER(ShardedStore):
    """Rank r of the G in ``group`` holds experts ``[r*R, (r+1)*R)`` (R = ceil(N/G)), their u and v whole.

    ``forward(ids (T, H, k), weights (T, H, k), x (T, in_dim)) -> (T, out_dim)``, the whole store's: each entry
    (expert, token, gate weight) goes to the rank owning its expert and the group's x is all-gathered; the owner
    takes each entry's dot product with its token's x, gates it and adds ``gate * v`` into one partial output
    per token of the group (a keyed bag), and the partials go back to their tokens' ranks and are summed in
    rank order. Per token and rank: (G-1)/G * L * (16 + w) bytes of entries, (G-1) * in_dim * x_bytes of
    inputs and (G-1) * out_dim * v of partials: more than by columns for wide experts, but every expert's
    state stays on one rank (row-wise Adagrad's per-row state shards only this way).
    """

    def __init__(self, store: PEERExperts, group: dist.ProcessGroup | None = None):
        G, r = self._check(store, group, PEERExperts)
        super().__init__(group)
        self._copy_options(store)
        self.block, self.rows = row_block(type(self).__name__, store.num_experts, G, r)
        self.u = nn.Parameter(store.u.detach()[slice(*self.rows)].clone())
        self.v = nn.Parameter(store.v.detach()[slice(*self.rows)].clone())

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"values": [self.u, self.v]}

    def split(self, param: nn.Parameter) -> tuple[int, int]:
        return 0, self.num_experts

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if weights.shape != ids.shape:
            raise ValueError(
                f"RowShardedPEER: weights must have the ids' shape {tuple(ids.shape)} (one gate per expert), "
                f"got {tuple(weights.shape)}"
            )
        T, G, L = ids.shape[0], self.world, ids.shape[1:].numel()
        self._check_inputs(ids)
        ids, weights = ids.reshape(-1), weights.reshape(-1)
        owner = torch.div(ids, self.block, rounding_mode="floor")
        token = torch.arange(T, device=ids.device).repeat_interleave(L)
        source, (local, token, w) = send_to_owners(owner, [ids - owner * self.block, token, weights], self.group)
        bag = source * T + token  # (E,): the (source rank, token) each entry here belongs to
        all_x = all_gather_rows(x, self.group)  # (G*T, in_dim)
        h = gather_dot(self.u, local.unsqueeze(1), all_x[bag], self.sparse_grad).squeeze(1)  # (E,)
        gates = w * ACTIVATIONS[self.activation](h)
        part = embedding_bag(
            self.v,
            local.view(1, -1),
            gates.view(1, -1),
            sparse_grad=self.sparse_grad,
            bags=bag.view(1, -1),
            num_bags=G * T,
        )  # (G*T, out_dim): block s holds our experts' part of rank s's tokens
        return all_to_all_rows(part, self.group).view(G, T, self.out_dim).sum(0)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_dim={self.in_dim}, out_dim={self.out_dim}, rows "
            f"{self.rows[0]}:{self.rows[1]} (rank {self.rank} of {self.world}), activation={self.activation!r}, "
            f"sparse_grad={self.sparse_grad}"
        )


PEER_SHARDINGS = {"column": ColumnShardedPEER, "row": RowShardedPEER}
