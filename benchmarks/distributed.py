"""Bytes a value table sharded over G processes moves per step and rank: computed by the README's formulas,
and measured by counting what each collective sends to the other ranks.

    python benchmarks/distributed.py                 # gloo on CPU, G = 2 and 4 (~1 min on 2 cores)
    python benchmarks/distributed.py --groups 2,4,8 --dim 256 --heads 4 --topk 32 --tokens 2048

Each of G processes (``torch.multiprocessing``, gloo) builds the same (N, d) fp32 table, shards it by columns
and by rows (``memlayers.distributed``), and reads its own T tokens (H heads x k ids, uniform over the
table) forward and backward, as a training step does. The collectives' ``torch.distributed`` calls are
wrapped to count the bytes this rank sends to others (an all-gather sends its tensor to G - 1 ranks, an
all-to-all every block but its own). Computed, per token and direction, with L = H*k entries of 8-byte ids
and w-byte weights and rows of d values of v bytes (the ids have no gradient; the weights' does, and the
output's):

    column: forward (G-1) * L * (8 + w) + (G-1)/G * d * v,   backward (G-1) * L * w + (G-1)/G * d * v
    row:    forward (G-1)/G * L * (16 + w) + (G-1) * d * v,  backward (G-1)/G * L * w + (G-1) * d * v

The row scheme's id traffic depends on how many entries land on other
ranks ((G-1)/G of them for uniform ids), so its measured bytes scatter around the formula; the small
messages (token counts, range flags, per-rank entry counts) are measured but not in the formula. Times are
gloo on a shared CPU: indicative only. NCCL on GPUs is unmeasured.
"""

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memlayers import ValueTable
from memlayers.distributed import SHARDINGS


def computed(sharding: str, G: int, L: int, d: int, w: int = 4, v: int = 4) -> float:
    """Bytes per token one rank sends, forward + backward (the README's formulas)."""
    if sharding == "column":
        return (G - 1) * L * (8 + 2 * w) + 2 * (G - 1) / G * d * v
    return (G - 1) / G * L * (16 + 2 * w) + 2 * (G - 1) * d * v


class Counter:
    """Wraps ``dist.all_gather`` and ``dist.all_to_all_single`` to count the bytes this rank sends elsewhere."""

    def __init__(self):
        self.sent = 0
        self._gather, self._all_to_all = dist.all_gather, dist.all_to_all_single

        def all_gather(parts, x, group=None, **kw):
            self.sent += (dist.get_world_size(group) - 1) * x.numel() * x.element_size()
            return self._gather(parts, x, group=group, **kw)

        def all_to_all_single(out, x, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            G, rank = dist.get_world_size(group), dist.get_rank(group)
            rows = input_split_sizes or [x.shape[0] // G] * G
            row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
            self.sent += (sum(rows) - rows[rank]) * row_bytes
            return self._all_to_all(out, x, output_split_sizes, input_split_sizes, group=group, **kw)

        dist.all_gather, dist.all_to_all_single = all_gather, all_to_all_single


def _worker(rank, G, port, args, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=G)
    counter = Counter()
    torch.manual_seed(0)
    table = ValueTable(args.rows, args.dim)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.rows, (args.tokens, args.heads, args.topk), generator=g)
    weights = torch.rand(args.tokens, args.heads, args.topk, generator=g, requires_grad=True)
    for sharding in ("column", "row"):
        store = SHARDINGS[sharding](table)
        store(ids, weights).sum().backward()  # warm-up
        counter.sent, times = 0, []
        for _ in range(args.repeats):
            store.weight.grad = weights.grad = None
            dist.barrier()
            tic = time.perf_counter()
            store(ids, weights).sum().backward()
            times.append(time.perf_counter() - tic)
        sent = torch.tensor([counter.sent / args.repeats / args.tokens])
        dist.all_reduce(sent)
        if rank == 0:
            results[(sharding, G)] = (sent.item() / G, sorted(times)[len(times) // 2])
    dist.barrier()  # every rank done before any tears its connections down (gloo may abort otherwise)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", default="2,4", help="memory group sizes G (processes), comma-separated")
    p.add_argument("--rows", type=int, default=65_536, help="table rows N")
    p.add_argument("--dim", type=int, default=256, help="row width d")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step T")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    L = args.heads * args.topk
    results = mp.Manager().dict()
    for G in groups:
        mp.spawn(_worker, args=(G, free_port(), args, results), nprocs=G, join=True)
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, gloo; N={args.rows:,}, d={args.dim}, "
          f"L={args.heads}x{args.topk}={L}, T={args.tokens} tokens per rank, fp32 values and weights, int64 ids")  # fmt: skip
    print("# bytes one rank sends per token, forward + backward; ms: median step (fwd+bwd) over "
          f"{args.repeats}\n")
    print("| sharding | G | computed B/token | measured B/token | measured / computed | ms per step (gloo, CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for sharding in ("column", "row"):
        for G in groups:
            sent, seconds = results[(sharding, G)]
            want = computed(sharding, G, L, args.dim)
            print(f"| {sharding} | {G} | {want:,.0f} | {sent:,.0f} | {sent / want:.3f} | {seconds * 1e3:.1f} |")


if __name__ == "__main__":
    main()
