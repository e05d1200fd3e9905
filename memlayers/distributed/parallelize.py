"""The parallelize step for the values: shard a model's value tables over a memory group, in place."""

import torch.distributed as dist
from torch import nn

from ..memory.stores import ValueTable
from .sharded_table import SHARDINGS


def shard_values(model: nn.Module, sharding: str = "column", group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every ``ValueTable`` in ``model`` by its shard on this rank (``SHARDINGS[sharding]``), in place.

    Owners (a module holding the table as a submodule, e.g. ``Transformer.pools``) and references (a layer or
    window reading a shared pool) get the same shard, so a pool shared by layers stays one shared shard.
    Every rank of ``group`` builds the same model (the same seed) and calls this; then each reads its own
    tokens and runs its backward (the reads are collective, in the same order on every rank). Other stores
    (PEER's experts, UltraMem's expansion, engram's tables) are left whole. Build the optimizer after this
    (it must hold the shards' parameters). Returns ``model``.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"shard_values: sharding must be one of {tuple(SHARDINGS)}, got {sharding!r}")
    shards: dict[int, nn.Module] = {}  # id(table) -> its shard

    def shard(table: ValueTable) -> nn.Module:
        if id(table) not in shards:
            shards[id(table)] = SHARDINGS[sharding](table, group)
        return shards[id(table)]

    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, ValueTable):
                module._modules[name] = shard(child)
        for name, value in list(vars(module).items()):  # references held outside _modules
            if isinstance(value, ValueTable):
                module.__dict__[name] = shard(value)
    if not shards:
        raise ValueError(f"shard_values: {type(model).__name__} has no ValueTable to shard")
    return model
