"""What keeping value tables off the compute device costs (CPU or GPU): decode tokens/s and resident memory with
the values in place, in host memory and in a memory-mapped file (``memlayers.serving.offload_values``), in
float32 and int8.

    python benchmarks/offloaded_values.py [--n-keys 1024] [--dim 256] [--batches 1,8,64] [--device cpu|cuda]

A 2-block model (random init) with one ``memory`` layer of n_keys² rows × dim (1024² × 256 float32: 1 GiB) decodes
``--new-tokens`` greedy tokens (KV cache) after an 8-token prompt, best of ``--repeats``, at each batch size. Each
setting runs in a fresh process, so that its resident memory is its own: RSS of the whole process, heap (which
must stay in RAM) apart from pages of mapped files (which the kernel drops under memory pressure and reads again),
after building and placing the model and after decoding; on a GPU also the device memory torch allocated. Prints one markdown table; ``same tokens`` says whether the decoded tokens
equal those with the values in place (exactness). ~2 min on 2 CPU cores at the defaults.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

SETTINGS = [(fmt, where) for fmt in ("float32", "int8") for where in ("in place", "host", "disk")]


def rss_mib() -> dict[str, float]:
    """This process's resident memory in MiB: "anon" (heap: must stay in RAM) and "file" (pages of mapped files,
    which the kernel can drop and read again)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[f"Rss{k.title()}"].split()[0]) / 1024 for k in ("anon", "file")}


def measure(args, fmt: str, where: str) -> dict:
    from memlayers.model import Transformer
    from memlayers.model.config import MemorySpec, ModelConfig
    from memlayers.serving import offload_values, quantize_values

    torch.manual_seed(0)
    memory = MemorySpec(layers="1", preset="memory", options={"n_keys": args.n_keys})
    config = ModelConfig(vocab_size=256, dim=args.dim, n_layers=2, n_heads=4, max_seq_len=64, memories=[memory])
    model = Transformer(config).eval()
    if fmt == "int8":
        quantize_values(model, "int8")
    with tempfile.TemporaryDirectory() as directory:
        if where != "in place":
            offload_values(model, where, directory if where == "disk" else None)
        model.to(args.device)
        row = {"rss": rss_mib(), "device": torch.cuda.memory_allocated() / 2**20 if args.device == "cuda" else 0.0}
        prompts = torch.randint(0, 256, (max(args.batches), 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            row["tokens"] = model.generate(prompts[:8].to(args.device), args.new_tokens).tolist()
            for b in args.batches:
                best = float("inf")
                for _ in range(args.repeats):
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    tic = time.perf_counter()
                    model.generate(prompts[:b].to(args.device), args.new_tokens)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - tic)
                row[f"tok/s@{b}"] = b * args.new_tokens / best
        row["rss after"] = rss_mib()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-keys", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("FMT", "WHERE"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, *args.one)))
        return
    device = "device MiB | " if args.device == "cuda" else ""
    lines = [f"| values | where | RSS MiB: heap / files | after decoding | {device}" + " | ".join(f"tok/s, batch {b}"
             for b in args.batches) + " | same tokens |", "|---|---|---:|---:|" + "---:|" * (len(args.batches) +
             bool(device)) + "---|"]  # fmt: skip
    reference = {}
    for fmt, where in SETTINGS:
        child = [sys.executable, __file__, *sys.argv[1:], "--one", fmt, where]
        row = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
        reference.setdefault(fmt, row["tokens"])
        cells = [fmt, where, *(f"{r['anon']:,.0f} / {r['file']:,.0f}" for r in (row["rss"], row["rss after"]))]
        cells += [f"{row['device']:,.0f}"] if device else []
        cells += [f"{row[f'tok/s@{b}']:,.0f}" for b in args.batches]
        cells += ["yes" if row["tokens"] == reference[fmt] else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
