"""Many processes on torch.distributed: value tables sharded over a memory group, by columns or by rows
(work in progress, issue 12: placing them in models, FSDP2 data parallelism, DCP checkpoints and the
trainer's ``parallel`` section are next)."""

from .collectives import all_gather_rows, all_to_all_rows
from .sharded_table import ColumnShardedTable, RowShardedTable, ShardedTable

SHARDINGS = {"column": ColumnShardedTable, "row": RowShardedTable}

__all__ = ["SHARDINGS", "ColumnShardedTable", "RowShardedTable", "ShardedTable", "all_gather_rows", "all_to_all_rows"]
