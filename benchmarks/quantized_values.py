"""What 8-bit value tables cost and save on trained checkpoints (CPU or GPU): recall, value-table bytes and
decoding speed with float32, int8 and fp8 values (``memlayers.serving.quantize_values``).

    python benchmarks/quantized_values.py runs/compare-cpu-tuned [--arms memory,memory_plus] [--batches 1,8,64]

For every ``<arm>`` and ``<arm>.seed<s>`` run under the folder: exact greedy recall of all the run's facts (records
probes), the value tables' bytes, and decode tokens/s (greedy, KV cache, ``--new-tokens`` tokens after the first
probe prompts, best of ``--repeats``) at each batch size. Prints one markdown table (mean over seeds; recall with
its seed spread). ~2 min on 2 CPU cores for the tuned comparison's two memory arms x 3 seeds.
"""

import argparse
import os
import statistics
import time

import torch

from memlayers.data import build_dataset
from memlayers.evaluate import probe_hits
from memlayers.serving import quantize_values
from memlayers.train import load_checkpoint

FORMATS = ("float32", "int8", "fp8")


def runs_of(folder: str, arm: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n == arm or n.startswith(arm + ".seed"))
    return [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n, "checkpoint.pt"))]


def value_bytes(model) -> int:
    from memlayers.optim import value_stores

    return sum(t.numel() * t.element_size() for s in value_stores(model) for t in (*s.parameters(recurse=False),
               *s.buffers(recurse=False)))  # fmt: skip


@torch.no_grad()
def decode_speed(model, prompts: list[list[int]], batch: int, new_tokens: int, repeats: int) -> float:
    """Tokens per second of greedy decoding ``batch`` rows (same-length prompts) for ``new_tokens`` steps."""
    length = len(prompts[0])
    rows = [p for p in prompts if len(p) == length][:batch]
    x = torch.tensor((rows * batch)[:batch])
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        model.generate(x, new_tokens)
        best = min(best, time.perf_counter() - tic)
    return batch * new_tokens / best


def measure(run: str, fmt: str, batches: list[int], new_tokens: int, repeats: int) -> dict:
    cfg, model, _ = load_checkpoint(run)
    if fmt != "float32":
        quantize_values(model, fmt)
    probes = build_dataset(cfg.data).probes("records")
    row = {"recall": probe_hits(model, probes).float().mean().item(), "bytes": value_bytes(model)}
    prompts = [p.prompt for p in probes]
    for b in batches:
        row[f"tok/s@{b}"] = decode_speed(model, prompts, b, new_tokens, repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a memlayers compare output folder (runs/compare-cpu-tuned)")
    parser.add_argument("--arms", default="memory,memory_plus")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    lines = ["| arm | values | seeds | recall | value bytes | " + " | ".join(f"tok/s, batch {b}" for b in batches) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(batches)]  # fmt: skip
    for arm in args.arms.split(","):
        runs = runs_of(args.folder, arm)
        if not runs:
            raise SystemExit(f"{args.folder}: no finished runs of arm {arm!r} (a folder {arm} or {arm}.seedN)")
        for fmt in FORMATS:
            rows = [measure(r, fmt, batches, args.new_tokens, args.repeats) for r in runs]
            recall = [r["recall"] for r in rows]
            spread = f" ± {100 * statistics.stdev(recall):.1f}" if len(rows) > 1 else ""
            cells = [arm, fmt, str(len(rows)), f"{100 * statistics.fmean(recall):.1f}%{spread}",
                     f"{statistics.fmean(r['bytes'] for r in rows) / 2**20:.2f} MiB"]  # fmt: skip
            cells += [f"{statistics.fmean(r[f'tok/s@{b}'] for r in rows):,.0f}" for b in batches]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
