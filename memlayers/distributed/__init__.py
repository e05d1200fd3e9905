"""Many processes on torch.distributed: ``parallelize`` lays a model out over torchrun's processes (FSDP2 for
the dense parameters, value stores sharded over memory groups by columns or rows, ``shard_values``), and
its ``Parallel`` plan reduces the value gradients and gives checkpoints every tensor's global view."""

from .collectives import all_gather_rows, all_reduce_sum, all_to_all_rows
from .parallelize import parallelize, shard_values, sharders
from .plan import OneProcess, Parallel
from .sharded_ive import IVE_SHARDINGS, ColumnShardedIVE, RowShardedIVE
from .sharded_peer import PEER_SHARDINGS, ColumnShardedPEER, RowShardedPEER
from .sharded_table import SHARDINGS, ColumnShardedTable, RowShardedTable, ShardedStore, ShardedTable

__all__ = [
    "IVE_SHARDINGS",
    "PEER_SHARDINGS",
    "SHARDINGS",
    "ColumnShardedIVE",
    "ColumnShardedPEER",
    "ColumnShardedTable",
    "OneProcess",
    "Parallel",
    "RowShardedIVE",
    "RowShardedPEER",
    "RowShardedTable",
    "ShardedStore",
    "ShardedTable",
    "all_gather_rows",
    "all_reduce_sum",
    "all_to_all_rows",
    "parallelize",
    "shard_values",
    "sharders",
]
