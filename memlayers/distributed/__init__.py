"""Many processes on torch.distributed: ``parallelize`` lays a model out over torchrun's processes (FSDP2 for
the dense parameters, value tables sharded over memory groups by columns or rows, ``shard_values``), and
its ``Parallel`` plan reduces the value gradients and gathers a run's state into one process's layout."""

from .collectives import all_gather_rows, all_reduce_sum, all_to_all_rows
from .parallelize import parallelize, shard_values, sharders
from .plan import OneProcess, Parallel
from .sharded_peer import ColumnShardedPEER
from .sharded_table import SHARDINGS, ColumnShardedTable, RowShardedTable, ShardedStore, ShardedTable

__all__ = [
    "SHARDINGS",
    "ColumnShardedPEER",
    "ColumnShardedTable",
    "OneProcess",
    "Parallel",
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
