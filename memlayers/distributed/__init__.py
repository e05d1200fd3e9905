"""Many processes on torch.distributed: value tables sharded over a memory group, by columns or by rows,
and placed in a model by ``shard_values`` (work in progress, issue 12: FSDP2 data parallelism, DCP
checkpoints and the trainer's ``parallel`` section are next)."""

from .collectives import all_gather_rows, all_to_all_rows
from .parallelize import shard_values
from .sharded_table import SHARDINGS, ColumnShardedTable, RowShardedTable, ShardedTable

__all__ = [
    "SHARDINGS", "ColumnShardedTable", "RowShardedTable", "ShardedTable", "all_gather_rows", "all_to_all_rows",
    "shard_values",
]  # fmt: skip
