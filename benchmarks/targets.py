"""Issue 11's targets and what the GPU benchmarks share: timing as training runs, verdicts, tables.

The targets hold on one H200 at DESIGN.md §4's config (``FULL``: 16,384 tokens, 4 heads x k = 32,
N = 1024^2 values, d = 1024, bf16). ``verdict`` judges a number only at that config on CUDA; anywhere
else (the CPU smoke runs at ``TINY`` sizes) the "meets target?" column says why it does not judge.
"""

import itertools
import math
import statistics
import time
from dataclasses import dataclass

import torch

FULL = {"tokens": 16384, "heads": 4, "topk": 32, "n_keys": 1024, "dim": 1024}
TINY = {"tokens": 64, "heads": 4, "topk": 4, "n_keys": 16, "dim": 64}

# issue 11, "Targets on an H200 at the config above"
BAG_FWD_CEILING = 0.9  # bag forward: "keep" its speed, i.e. >= 90% of the copy ceiling (issue 4)
BAG_FWD_BWD_MS = 2.5
TOPK_FWD_BWD_MS = 1.0
LAYER_OVER_FFN = 2.0  # whole Memory+ layer fwd+bwd with its value update <= 2x the SwiGLU FFN's step
SPARSE_OVER_DENSE = 1.0  # the sparse path no slower than the dense one
UPDATE_GROWTH = 1.2  # value update at 4M / 16M rows within 1.2x of 1M rows, for the same touched rows
MEMORY_ARM_SPEED = 0.8  # training tokens/s of a memory arm / the dense arm's, --preset gpu
MOE_ARM_SPEED = 0.7


@dataclass
class Row:
    """One table line: ``measured`` and ``target`` carry their units ("1.234 ms", "0.85x")."""

    what: str
    measured: str
    target: str = "-"
    meets: str = "-"
    note: str = ""


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def failed_row(what: str, error: BaseException) -> Row:
    return Row(what, f"failed: {first_line(error)}")


def verdict(value: float, limit: float, judged: str | None, at_least: bool = False) -> str:
    """``"yes"`` / ``"no"`` for ``value <= limit`` (``>=`` with ``at_least``); ``judged``: None when the run
    is at the target config, else why it is not judged (printed instead)."""
    if judged is not None:
        return f"n/a ({judged})"
    if math.isnan(value) or math.isnan(limit):
        return "n/a (not measured)"
    return "yes" if (value >= limit if at_least else value <= limit) else "no"


def not_judged(device: torch.device, config: dict) -> str | None:
    """None when targets apply (CUDA, the FULL config), else the reason they do not."""
    if device.type != "cuda":
        return "CPU run"
    if any(config.get(k) != v for k, v in FULL.items()):
        return "not the target config"
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phases(phases, device: torch.device, warmup: int = 3, iters: int = 10) -> list[float]:
    """Run the callables ``phases`` in order, ``warmup`` + ``iters`` times; return the median ms of each
    phase and, last, the median of the per-iteration totals.

    CUDA: one event between consecutive phases, all read after one final synchronize, so the
    iterations queue back to back as in training (a phase that syncs the host is timed with it).
    CPU: ``time.perf_counter`` around each phase.
    """
    for _ in range(warmup):
        for phase in phases:
            phase()
    sync(device)
    per_iter = []
    if device.type == "cuda":
        marks = []
        for _ in range(iters):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
            events[0].record()
            for phase, event in zip(phases, events[1:]):
                phase()
                event.record()
            marks.append(events)
        torch.cuda.synchronize(device)
        per_iter = [[a.elapsed_time(b) for a, b in itertools.pairwise(ev)] for ev in marks]
    else:
        for _ in range(iters):
            times, last = [], time.perf_counter()
            for phase in phases:
                phase()
                now = time.perf_counter()
                times.append(1e3 * (now - last))
                last = now
            per_iter.append(times)
    medians = [statistics.median(t[i] for t in per_iter) for i in range(len(phases))]
    return medians + [statistics.median(sum(t) for t in per_iter)]


def time_ms(fn, device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median ms of ``fn()``."""
    return time_phases([fn], device, warmup, iters)[-1]


def ms(value: float) -> str:
    return f"{value:.3f} ms"


def print_grid(title: str, head: tuple, rows: list[tuple]) -> None:
    """A markdown table of strings, columns padded to their widest cell."""
    cells = [tuple(head)] + [tuple(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    print(f"\n{title}")
    for i, c in enumerate(cells):
        print("| " + " | ".join(s.ljust(w) for s, w in zip(c, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(flush=True)


def print_table(title: str, rows: list[Row]) -> None:
    """what | measured | target | meets target? | note."""
    head = ("what", "measured", "target", "meets target?", "note")
    print_grid(title, head, [(r.what, r.measured, r.target, r.meets, r.note) for r in rows])
