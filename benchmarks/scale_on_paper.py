"""Scale on paper: memory per GPU, bytes each GPU sends per step and the expected step time of the memory
layers, for the paper's largest memory and for 2026-size n-gram tables, on H100/H200 clusters of 8-512 GPUs.

    python benchmarks/scale_on_paper.py
    python benchmarks/scale_on_paper.py --tokens 8192 --nvlink 450 --network 50

Nothing here runs on a GPU: every number is computed from

* the bag kernel's rate measured on one NVIDIA H200 (benchmarks/RESULTS.md, 2026-11-30: fwd+bwd of T = 16,384
  tokens x L = 128 rows of d = 1,024 bf16 values in 5.16 ms, i.e. 4.3 GB of rows read in 5.16 ms), scaled
  by the bytes a GPU's share reads; an H100 is assumed to run it at its HBM bandwidth ratio (3.35 / 4.8 TB/s):
  that H100 figure is not measured;
* the bytes a rank sends per token (``memlayers.distributed.sharded_table``, measured to match on CPU by
  ``benchmarks/distributed.py``), forward + backward;
* stated link bandwidths (per GPU and direction, defaults): NVLink 450 GB/s inside an 8-GPU node, the
  network 50 GB/s (one 400 Gb/s NIC per GPU) across nodes; a memory group larger than a node sends
  (G - 8)/(G - 1) of its bytes over the network;
* per GPU and step ``--tokens`` tokens; the memory read by ``--reads`` layers (the paper's Memory+ shares one
  pool between several layers); values bf16 with two fp32 Adam moments (10 bytes per value, no master copy).

The step time is the memory layers' kernels plus their communication, serial (no overlap: an upper bound)
and overlapped (the larger of the two: a lower bound). The memory group is every GPU (the table split G
ways); the dense model and its FSDP traffic are not counted. What the tables show: the bytes sent grow
with G for both schemes (columns all-gather every rank's ids, rows send a partial output from every owner:
ours sends one for every token, also where an owner holds none of its rows), so past a node (G > 8) the
network dominates; keep memory groups as small as the table allows and replicate them (``parallel.memory``).
"""

import argparse

MEASURED_BAG_MS = 5.16  # fwd+bwd, H200, T=16384, L=128, d=1024 bf16 (RESULTS.md)
MEASURED_BAG_BYTES = 16_384 * 128 * 1024 * 2
HBM_TBPS = {"H200": 4.8, "H100": 3.35}
GPUS = (8, 16, 32, 64, 128, 256, 512)

CONFIGS = {  # name -> (rows N, width d, entries per token L, weight bytes w, description)
    "paper-128B": (64 * 2**20, 2048, 4 * 32, 4, "Memory+ of Berges et al. 2024: 64M values x 2,048 (128B params), 4 heads x k=32"),
    "ngram-1e8": (10**8, 1024, 16, 0, "hashed n-gram table, 1e8 rows x 1,024 (102B params), 2 orders x 8 hash heads"),
    "ngram-1e9": (10**9, 256, 16, 0, "hashed n-gram table, 1e9 rows x 256 (256B params), 2 orders x 8 hash heads"),
}  # fmt: skip


def bytes_per_token(sharding: str, G: int, L: int, d: int, w: int, v: int = 2) -> float:
    """Forward + backward bytes one rank sends per token (8-byte ids; weights of w bytes, 0 for unweighted
    reads; values of v bytes)."""
    if sharding == "column":
        return (G - 1) * L * (8 + 2 * w) + 2 * (G - 1) / G * d * v
    return (G - 1) / G * L * (16 + 2 * w) + 2 * (G - 1) * d * v


def link_seconds(nbytes: float, G: int, nvlink: float, network: float) -> float:
    """Time to send ``nbytes`` spread evenly over the G - 1 other ranks, 8 GPUs per node."""
    inside = min(G, 8) - 1
    return nbytes * (inside / (G - 1)) / (nvlink * 1e9) + nbytes * ((G - 1 - inside) / (G - 1)) / (network * 1e9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16_384, help="tokens per GPU per step")
    p.add_argument("--reads", type=int, default=3, help="memory layers reading the table (paper: 3); n-gram: 1")
    p.add_argument("--nvlink", type=float, default=450.0, help="GB/s per GPU and direction inside a node")
    p.add_argument("--network", type=float, default=50.0, help="GB/s per GPU and direction across nodes")
    args = p.parse_args()
    print(__doc__.split("\n\n")[0].replace("\n", " "))
    print(f"\n# {args.tokens:,} tokens per GPU and step; NVLink {args.nvlink:g} GB/s, network {args.network:g} "
          f"GB/s; the bag's fwd+bwd rate measured on an H200, H100 scaled by HBM bandwidth (unmeasured)")  # fmt: skip
    for name, (N, d, L, w, description) in CONFIGS.items():
        reads = args.reads if name.startswith("paper") else 1
        print(f"\n## {name}: {description}; read by {reads} layer(s)\n")
        print("| GPUs (= memory group) | table + Adam per GPU (GB) | fits H200 / H100 | sharding "
              "| sent per GPU per step (GB) | comm ms | bag ms H200 / H100 | step ms H200, serial / overlapped |")  # fmt: skip
        print("|---:|---:|---|---|---:|---:|---:|---:|")
        rows_read = args.tokens * L * d * 2 * reads  # bytes of rows one GPU's share reads per step
        bag = {gpu: MEASURED_BAG_MS * rows_read / MEASURED_BAG_BYTES * HBM_TBPS["H200"] / tb for gpu, tb in HBM_TBPS.items()}
        for G in GPUS:
            state = N * d * 10 / G / 1e9
            for sharding in ("column", "row"):
                if sharding == "column" and d % G:
                    continue
                sent = bytes_per_token(sharding, G, L, d, w) * args.tokens * reads
                comm = link_seconds(sent, G, args.nvlink, args.network) * 1e3
                fits = " / ".join("yes" if state < memory else "no" for memory in (141, 80))
                print(f"| {G} | {state:,.1f} | {fits} | {sharding} | {sent / 1e9:.2f} | {comm:,.1f} | "
                      f"{bag['H200']:.1f} / {bag['H100']:.1f} | {bag['H200'] + comm:,.1f} / {max(bag['H200'], comm):,.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
