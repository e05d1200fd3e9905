"""How a training step spreads over processes: ``OneProcess`` (nothing to do) and ``Parallel`` (what
``parallelize`` returns). The trainer asks its plan and never checks which one it has.

Checkpoints see every tensor laid out like a parameter (the parameter, its optimizer state) in its global
view (``global_view``, ``empty``, ``local``): whole tensors in one process, DTensors of the whole where the
parameter is split over processes (FSDP2's shards, value shards on the (replica, memory) mesh), so that
torch.distributed.checkpoint saves each rank's part and loads it into any other layout.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor import empty as distributed_empty

from ..metrics import UsageTracker
from ..optim.clip import grad_norm
from ..optim.combined import optimizer_parts
from ..optim.groups import value_parameters
from ..optim.row_sparse import row_sparse_grad
from .sharded_table import ShardedStore


def _map_optimizer_state(optimizer, state: dict, fn) -> dict:
    """``state`` (``optimizer.state_dict()``'s layout) with every non-scalar state tensor t of parameter p
    replaced by ``fn(p, t)``, in one fixed order (the same on every rank: ``fn`` may be collective)."""
    parts = state["optimizers"] if hasattr(optimizer, "optimizers") else [state]
    out = []
    for opt, part in zip(optimizer_parts(optimizer), parts, strict=True):
        params = [p for group in opt.param_groups for p in group["params"]]
        mapped = {
            i: {k: fn(params[i], v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
            for i, s in sorted(part["state"].items())
        }
        out.append({**part, "state": mapped})
    return {"optimizers": out} if hasattr(optimizer, "optimizers") else out[0]


class OneProcess:
    """The plan of a run in one process: every method is the identity or the single-process operation
    (``Parallel`` has the same methods)."""

    world, rank, is_main = 1, 0, True

    def batch_rows(self, rows: int) -> slice:
        return slice(None)

    def reduce_value_grads(self, optimizer=None) -> None:
        pass

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        return grad_norm(params)

    def update_norm(self, squares: list[tuple[nn.Parameter, torch.Tensor]]) -> torch.Tensor:
        """The 2-norm of a fused value update's gradients from its (table, squared norm) parts."""
        return torch.stack([sq.float() for _, sq in squares]).sum().sqrt() if squares else torch.zeros(())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def global_view(self, param: nn.Parameter | None, t: torch.Tensor) -> torch.Tensor:
        """``t``, laid out like ``param`` (None: a buffer), as the whole tensor: here it is the whole."""
        return t

    def empty(self, param: nn.Parameter, size: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor to load a whole tensor of ``size`` into, laid out like ``param`` where its shape allows."""
        return torch.empty(size, dtype=dtype, device=param.device)

    def local(self, param: nn.Parameter, t: torch.Tensor) -> torch.Tensor:
        """What this process keeps of ``global_view``'s or ``empty``'s ``t``."""
        return t

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def global_usage(self, model: nn.Module):
        """A context in which the model's usage trackers hold what every rank's tokens recorded."""
        return contextlib.nullcontext()

    def loaded_usage(self, model: nn.Module) -> None:
        """Called after every rank loaded the same (global) usage state."""


@dataclass
class Parallel:
    """A model laid out over the ranks of the default process group by ``parallelize``.

    Every rank reads its own tokens (``batch_rows``): the W ranks are data-parallel for the dense parameters
    (FSDP2 over all of them). The ranks form W/M replica groups of M-rank memory groups, ranks
    ``[j*M, (j+1)*M)`` for memory group j; the value stores ``sharders`` knows are sharded over each memory
    group (M > 1), the others replicated on every rank. The gradient of a shard holds its memory group's tokens and
    ``reduce_value_grads`` sums it over the replicas of the shard; a replicated store's over every rank.

    Losses: each rank's loss must be its share of the global one (its tokens' summed loss over the global
    token count, as the trainer weights it), so that gradients add up: FSDP2 sums, it does not average.
    """

    model: nn.Module
    world: int
    rank: int
    replica_group: dist.ProcessGroup | None  # the ranks holding the same shards (None: M == 1)
    memory_group: dist.ProcessGroup | None
    mesh: DeviceMesh | None  # (replica, memory): where the value shards' DTensors live (None: M == 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_rows(self, rows: int) -> slice:
        """The rows of a global batch of ``rows`` sequences that this rank reads."""
        if rows % self.world:
            raise ValueError(
                f"a global batch of {rows} sequences does not split over {self.world} processes; use a batch size "
                f"(train.batch_size) that {self.world} divides"
            )
        per = rows // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def _shards(self) -> dict[int, ShardedStore]:
        """Every sharded parameter's store (a sharded store's values: its other parameters, e.g. UltraMem's
        projection, are whole and FSDP2's)."""
        stores = [m for m in self.model.modules() if isinstance(m, ShardedStore)]
        return {id(p): m for m in stores for p in m.param_roles()["values"]}

    @torch.no_grad()
    def reduce_value_grads(self, optimizer=None) -> None:
        """After the backward: sum every value gradient over the ranks that hold the same values (dense
        gradients by an all-reduce, row-sparse ones by all-gathering their rows). A parameter some rank's
        tokens read gets a gradient on every rank (zeros where none read it, as one process's table would).
        A fused value update (``optimizer``'s parts that collect the backward's pieces, ``collected``) gets
        every such rank's pieces instead, applied by ``optimizer.step()``. Collective."""
        shards = self._shards()
        for p in value_parameters(self.model):
            kind = torch.tensor([p.grad is not None, p.grad is not None and p.grad.is_sparse], device=p.device)
            dist.all_reduce(kind, op=dist.ReduceOp.MAX)
            if not kind[0]:
                continue  # no rank read it
            if p.grad is None and kind[1]:
                empty = p.new_zeros(1, 0, dtype=torch.long)
                p.grad = torch.sparse_coo_tensor(empty, p.new_zeros(0, *p.shape[1:]), p.shape, is_coalesced=True)
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
            group = self.replica_group if id(p) in shards else None
            if group is not None and dist.get_world_size(group) == 1:
                continue
            if kind[1]:
                p.grad = _all_reduce_rows(p, group)
            else:
                dist.all_reduce(p.grad, group=group)
        for part in optimizer_parts(optimizer) if optimizer is not None else []:
            if hasattr(part, "collected"):
                self._gather_collected(part, shards)

    def _gather_collected(self, fused, shards) -> None:
        """Every replica's collected pieces of each of ``fused``'s tables, on every replica; a table some process
        read gets a piece on every process, if empty, so that every shard's step count moves as one process's
        table's would (collective)."""
        for p in (p for group in fused.param_groups for p in group["params"]):
            piece = fused.collected(p)
            read = torch.tensor(piece is not None, device=p.device)
            dist.all_reduce(read, op=dist.ReduceOp.MAX)
            if not read:
                continue
            if piece is None:
                empty = torch.zeros(0, dtype=torch.long, device=p.device)
                piece = (
                    empty,
                    p.new_zeros(0, dtype=torch.float32),
                    empty,
                    p.new_zeros(0, p.shape[1], dtype=torch.float32),
                )
            group = self.replica_group if id(p) in shards else None
            if group is None or dist.get_world_size(group) > 1:
                ids, weights, rows, src = piece
                parts = _all_gather_varlen([ids, weights.float(), rows, src.float()], group)
                offsets = torch.tensor([0] + [r[3].shape[0] for r in parts[:-1]], device=p.device).cumsum(0)
                piece = (
                    torch.cat([r[0] for r in parts]),
                    torch.cat([r[1] for r in parts]).to(weights.dtype),
                    torch.cat([r[2] + o for r, o in zip(parts, offsets)]),
                    torch.cat([r[3] for r in parts]).to(src.dtype),
                )
            fused.replace_collected(p, *piece)

    @torch.no_grad()
    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The global 2-norm of ``params``' gradients (``clip_grad_norms``' ``norm_fn``): FSDP2's shards summed
        over every rank, value shards over their memory group, replicated gradients counted once."""
        shards = self._shards()
        device = next(self.model.parameters()).device
        world_sq, memory_sq, local_sq = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(3))
        for p in params:
            g = row_sparse_grad(p)[1] if p.grad.is_sparse else p.grad
            if hasattr(g, "to_local"):  # an FSDP2 shard (DTensor)
                world_sq += g.to_local().double().square().sum()
            elif id(p) in shards:
                memory_sq += g.double().square().sum()
            else:
                local_sq += g.double().square().sum()
        dist.all_reduce(world_sq)
        if self.memory_group is not None:
            dist.all_reduce(memory_sq, group=self.memory_group)
        return (world_sq + memory_sq + local_sq).sqrt().float()

    @torch.no_grad()
    def update_norm(self, squares: list[tuple[nn.Parameter, torch.Tensor]]) -> torch.Tensor:
        """The global 2-norm of a fused value update's gradients from this rank's (table, squared norm) parts:
        a shard's summed over its memory group, a whole table's (the same on every rank) counted once.
        Collective."""
        shards = self._shards()
        device = next(self.model.parameters()).device
        sharded, whole = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(2))
        for p, sq in squares:
            if id(p) in shards:
                sharded += sq.double()
            else:
                whole += sq.double()
        if self.memory_group is not None:
            dist.all_reduce(sharded, group=self.memory_group)
        return (sharded + whole).sqrt().float()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every rank (collective)."""
        t = t.clone()
        dist.all_reduce(t)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def _split(self, param: nn.Parameter | None, t: torch.Tensor) -> tuple[int, int] | None:
        """(dimension, whole size) along which ``t``, laid out like a value shard's ``param``, is split; None
        for a tensor that is not (another parameter's, a buffer, a scalar, a per-row state of a column shard)."""
        store = self._shards().get(id(param))
        if store is None:
            return None
        dim, size = store.split(param)
        return (dim, size) if t.dim() > dim else None

    def global_view(self, param: nn.Parameter | None, t: torch.Tensor) -> torch.Tensor:
        """``t`` laid out like ``param`` as the whole tensor: FSDP2's tensors are DTensors already, a value
        shard's part becomes one (replicated over the replicas, split over the memory group)."""
        split = self._split(param, t)
        if split is None:
            return t
        dim, size = split
        shape = (*t.shape[:dim], size, *t.shape[dim + 1 :])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t, self.mesh, [Replicate(), Shard(dim)], run_check=False, shape=shape, stride=stride)

    def empty(self, param: nn.Parameter, size: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An (uninitialised) tensor of whole ``size`` laid out like ``param``: FSDP2's layout for a tensor of
        its parameter's shape, a value shard's for one split the same way, else the whole tensor."""
        if isinstance(param, DTensor) and tuple(size) == tuple(param.shape):
            return distributed_empty(size, dtype=dtype, device_mesh=param.device_mesh, placements=param.placements)
        split = self._split(param, torch.empty(size, device="meta"))
        if split is not None and size[split[0]] == split[1]:
            return distributed_empty(
                size, dtype=dtype, device_mesh=self.mesh, placements=[Replicate(), Shard(split[0])]
            )
        device = param.to_local().device if isinstance(param, DTensor) else param.device
        return torch.empty(size, dtype=dtype, device=device)

    def local(self, param: nn.Parameter, t: torch.Tensor) -> torch.Tensor:
        """A value shard's part of a DTensor; FSDP2's DTensors and whole tensors as they are."""
        return t.to_local() if isinstance(t, DTensor) and id(param) in self._shards() else t

    @torch.no_grad()
    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Load one process's optimizer state (a one-file checkpoint's) into this layout: each rank keeps its parts."""
        from torch.distributed.tensor import distribute_tensor

        shards = self._shards()

        def part(p, t):
            if hasattr(p, "device_mesh"):  # an FSDP2 parameter: its shard of t
                return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
            return shards[id(p)].part(t, p) if id(p) in shards else t

        optimizer.load_state_dict(_map_optimizer_state(optimizer, state, part))

    @contextlib.contextmanager
    def global_usage(self, model: nn.Module):
        """The usage trackers summed over every rank for the time of the context (metrics, checkpoints), then
        each rank's own counts again (collective)."""
        trackers = [m for m in model.modules() if isinstance(m, UsageTracker)]
        own = [{name: getattr(t, name).clone() for name in (*t._SUMMED, "last_seen")} for t in trackers]
        for t in trackers:
            t.all_reduce_()
        try:
            yield
        finally:
            for t, buffers in zip(trackers, own):
                for name, value in buffers.items():
                    getattr(t, name).copy_(value)

    def loaded_usage(self, model: nn.Module) -> None:
        """Rank 0 keeps the loaded global counts, the others start from zero: the sum stays the global count."""
        if not self.is_main:
            for t in model.modules():
                if isinstance(t, UsageTracker):
                    t.clear_counts_()


def _all_gather_varlen(tensors: list[torch.Tensor], group) -> list[list[torch.Tensor]]:
    """Every rank's ``tensors`` (each (n_i, ...), the lengths differing per tensor and rank), in rank order."""
    G = dist.get_world_size(group)
    device = tensors[0].device
    lengths = torch.tensor([t.shape[0] for t in tensors], device=device)
    all_lengths = [torch.empty_like(lengths) for _ in range(G)]
    dist.all_gather(all_lengths, lengths, group=group)
    all_lengths = torch.stack(all_lengths).tolist()  # (G, len(tensors))
    out = [[] for _ in range(G)]
    for j, t in enumerate(tensors):
        longest = max(n[j] for n in all_lengths)
        padded = t.new_zeros(longest, *t.shape[1:])
        padded[: t.shape[0]] = t
        gathered = [torch.empty_like(padded) for _ in range(G)]
        dist.all_gather(gathered, padded, group=group)
        for r in range(G):
            out[r].append(gathered[r][: all_lengths[r][j]])
    return out


def _all_reduce_rows(p: nn.Parameter, group) -> torch.Tensor:
    """The sum over ``group`` of a row-sparse gradient, row-sparse and coalesced (rows all-gathered)."""
    parts = _all_gather_varlen(list(row_sparse_grad(p)), group)
    rows = torch.cat([r for r, _ in parts])
    values = torch.cat([v for _, v in parts])
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, p.shape).coalesce()
