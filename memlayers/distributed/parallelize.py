"""The parallelize steps: shard a model's value tables over memory groups (``shard_values``), and train the
model on many processes (``parallelize``): FSDP2 for the dense parameters, the value stores sharded or
replicated beside it, batch-norm statistics over every rank's tokens."""

import torch
import torch.distributed as dist
from torch import nn

from ..memory.stores import ImplicitValueExpansion, PEERExperts, ValueTable
from ..optim.groups import value_parameters
from .plan import Parallel
from .sharded_ive import IVE_SHARDINGS
from .sharded_peer import PEER_SHARDINGS
from .sharded_table import SHARDINGS


def sharders(sharding: str) -> dict[type, type]:
    """The store types ``shard_values`` shards, each with its sharded store by ``sharding`` (torchrec's sharder
    per module type): ``ValueTable`` (and subclasses, e.g. engram's ``ConcatTable``), UltraMem's implicit value
    expansion and PEER's experts (also UltraMemV2's tables)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"shard_values: sharding must be one of {tuple(SHARDINGS)}, got {sharding!r}")
    return {
        ValueTable: SHARDINGS[sharding],
        ImplicitValueExpansion: IVE_SHARDINGS[sharding],
        PEERExperts: PEER_SHARDINGS[sharding],
    }


def shard_values(model: nn.Module, sharding: str = "column", group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every value store of ``model`` that ``sharders`` knows (value tables, UltraMem's expansion, PEER's
    experts) by its shard on this rank, in place.

    Owners (a module holding the store as a submodule, e.g. ``Transformer.pools``) and references (a layer or
    window reading a shared pool) get the same shard, so a pool shared by layers stays one shared shard.
    Every rank of ``group`` builds the same model (the same seed) and calls this; then each reads its own
    tokens and runs its backward (the reads are collective, in the same order on every rank). Other stores
    are left whole. Build the optimizer after this (it must hold the shards'
    parameters). Returns ``model``.
    """
    kinds = sharders(sharding)
    shards: dict[int, nn.Module] = {}  # id(store) -> its shard

    def shard(store: nn.Module) -> nn.Module | None:
        kind = next((k for k in kinds if isinstance(store, k)), None)
        if kind is None:
            return None
        if id(store) not in shards:
            shards[id(store)] = kinds[kind](store, group)
        return shards[id(store)]

    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if (sharded := shard(child)) is not None:
                module._modules[name] = sharded
        for name, value in list(vars(module).items()):  # references held outside _modules
            if isinstance(value, nn.Module) and (sharded := shard(value)) is not None:
                module.__dict__[name] = sharded
    if not shards:
        raise ValueError(f"shard_values: {type(model).__name__} has no value store to shard")
    return model


def parallelize(model: nn.Module, memory: int = 1, sharding: str = "column", mixed_precision: bool = False) -> Parallel:
    """Lay ``model`` out over every rank of the default process group, in place (torchtitan's parallelize step).

    ``memory`` (M): the size of each memory group, over which value tables are sharded by ``sharding``
    ("column" or "row"; M = 1: no sharding). The world size must be a multiple of M. Then FSDP2
    (``fully_shard``) on every block and on the model, for all parameters but the value stores' (left to
    ``Parallel.reduce_value_grads``), summing gradients; with ``mixed_precision`` (CUDA) bf16 parameters in
    the forward and fp32 gradient reduction. Batch norms of queries gather their statistics over every
    rank's tokens, and so do MoE's load-balancing loss, query whitening and the sub-key balance loss. Every rank builds the same model from the same seed and calls this; build the optimizer
    after it. Returns the ``Parallel`` plan.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "parallelize: torch.distributed is not initialised; launch with torchrun and call "
            "torch.distributed.init_process_group first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if memory < 1 or world % memory:
        raise ValueError(
            f"parallelize: {world} processes do not split into memory groups of {memory}; use a memory group size "
            f"(parallel.memory) that divides the number of processes"
        )
    if sharding not in SHARDINGS:
        raise ValueError(f"parallelize: sharding must be one of {tuple(SHARDINGS)}, got {sharding!r}")
    for module in model.modules():
        if reason := getattr(module, "one_process_only", None):
            raise ValueError(f"parallelize: {reason}")
    device = next(model.parameters()).device
    replica_group = memory_group = mesh = None
    world_mesh = init_device_mesh(device.type, (world,))
    if memory > 1:
        mesh = init_device_mesh(device.type, (world // memory, memory), mesh_dim_names=("replica", "memory"))
        replica_group, memory_group = mesh.get_group("replica"), mesh.get_group("memory")
        shard_values(model, sharding, memory_group)
    for module in model.modules():  # batch statistics (query batch norms, MoE balance) over every rank's tokens
        if hasattr(module, "sync_group"):
            module.sync_group = dist.group.WORLD
    ignored = set(value_parameters(model))
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mixed_precision else MixedPrecisionPolicy()
    blocks = getattr(model, "blocks", [])
    for module in [*blocks, model]:
        # a block whose parts have an auxiliary loss (UltraMem's core penalty, read by the model after the block's
        # forward) keeps its whole parameters until its backward: the loss is then of plain tensors
        keep = any(m.aux_loss() is not None for m in module.modules() if hasattr(m, "aux_loss"))
        options = {"reshard_after_forward": False} if keep else {}  # (else FSDP2's defaults, the root's its own)
        fully_shard(module, mesh=world_mesh, mp_policy=policy, ignored_params=ignored, **options)
        module.set_gradient_divide_factor(1.0)  # the losses are pre-weighted: sum, do not average
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return Parallel(model, world, rank, replica_group, memory_group, mesh)
