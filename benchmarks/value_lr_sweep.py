"""Recall against the value learning rate, for each value optimizer, on the two facts tasks (CPU).

    python benchmarks/value_lr_sweep.py [--tasks demo,lm] [--out runs/value-lr-sweep]

demo: ``memlayers demo`` (one memory layer, 4,096 Zipf facts), 300 steps, no baseline, 2 threads;
lm: the ``memory_plus`` arm of ``memlayers compare --preset cpu`` (a 4-layer LM on 300 people's
records) with row-sparse values. Each cell is the recall of all facts after training with
``value_lr = ratio x base lr``. The defaults in ``memlayers.optim.VALUE_LR_RATIOS`` come from this
table. The lm runs are kept under ``--out`` and reused when the script runs again. ~30 min on 2 cores.
"""

import argparse
import contextlib
import io
import sys

from memlayers.compare import run_compare
from memlayers.demo import DemoConfig, run_demo
from memlayers.optim import VALUE_LR_RATIOS

RATIOS = {
    "adamw": [10],
    "sparse_adam": [10],
    "sparse_adagrad": [10, 100, 300, 1000, 3000],
    "sparse_sgd": [1e6, 1e7, 3e7, 1e8],
}


def demo_recall(optimizer: str, ratio: float) -> float:
    cfg = DemoConfig(steps=300, baseline=False, value_optimizer=optimizer, value_lr_ratio=ratio, threads=2)
    return run_demo(cfg, progress=False, report=False)["memory"]["recall"]


def lm_recall(optimizer: str, ratio: float, out: str) -> float:
    overrides = [f"train.value_optimizer={optimizer}", f"train.value_lr_ratio={ratio}"]
    if optimizer != "adamw":
        overrides.append("model.memories[0].options.sparse_values=true")
    out_dir = f"{out}/{optimizer}-{ratio:g}"
    with contextlib.redirect_stdout(io.StringIO()):  # run_compare prints its own one-row table
        rows = run_compare("cpu", out_dir, arms=["memory_plus"], overrides=overrides, progress=False)
    return rows[0]["recall/records"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="demo,lm", help="comma-separated: demo, lm")
    p.add_argument("--out", default="runs/value-lr-sweep", help="where the lm runs go")
    a = p.parse_args()
    tasks = a.tasks.split(",")
    if not set(tasks) <= {"demo", "lm"}:
        sys.exit(f"--tasks: use demo and/or lm, got {a.tasks!r}")
    table = []
    for optimizer, ratios in RATIOS.items():
        for ratio in ratios:
            cells = {}
            if "demo" in tasks:
                cells["demo"] = demo_recall(optimizer, ratio)
            if "lm" in tasks:
                cells["lm"] = lm_recall(optimizer, ratio, a.out)
            table.append((optimizer, ratio, cells))
            print(f"  {optimizer} x{ratio:g}: " + ", ".join(f"{k} {v:.1%}" for k, v in cells.items()), file=sys.stderr)
    print(f"\n| value optimizer | value lr / base lr | {' | '.join(f'recall, {t}' for t in tasks)} |")
    print(f"|---|---:|{'---:|' * len(tasks)}")
    for optimizer, ratio, cells in table:
        mark = " (default)" if ratio == VALUE_LR_RATIOS[optimizer] else ""
        print(f"| {optimizer} | {ratio:g}{mark} | " + " | ".join(f"{cells[t]:.1%}" for t in tasks) + " |")


if __name__ == "__main__":
    main()
