"""A value table sharded over processes reads like the whole table.

    torchrun --nproc-per-node 2 examples/sharded_values.py [column|row]

Every process builds the same table from one seed and keeps its shard, reads its own tokens through the
shard (forward and backward: both are collective) and checks the result against the whole table.
"""

import sys

import torch
import torch.distributed as dist

from memlayers import ValueTable
from memlayers.distributed import SHARDINGS


def main(sharding: str = "column") -> None:
    dist.init_process_group("gloo")  # "nccl" on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    table = ValueTable(num_values=1000, dim=64)  # the same on every rank
    store = SHARDINGS[sharding](table)  # this rank's columns (or rows)

    g = torch.Generator().manual_seed(rank)  # this rank's tokens: 8 of them, 4 heads x top-16 slots each
    ids, weights = torch.randint(0, 1000, (8, 4, 16), generator=g), torch.rand(8, 4, 16, generator=g)
    weights.requires_grad_()
    out = store(ids, weights)  # (8, 64): the whole table's rows, summed
    out.square().sum().backward()

    whole = table(ids, weights.detach().requires_grad_())
    ok = torch.allclose(out, whole, rtol=1e-5, atol=1e-6)
    print(f"rank {rank}/{world}: {store.extra_repr()}; output matches the whole table: {ok}")
    dist.barrier()  # every rank done before any tears its connections down (gloo may abort otherwise)
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
