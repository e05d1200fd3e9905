"""The comparison's outputs: one plain-text table, CSV and JSON files, and two PNG plots.

Every function takes ``rows``: one dict per arm, as ``memlayers.compare.runner.arm_row`` builds them, or,
over several seeds, as ``aggregate`` makes them (each number the mean, with ``<key>_std``, ``_min``, ``_max``).
"""

import csv
import io
import json
import math
import os
import statistics

from .._extras import require
from ..train import atomic_write

# (key in a row, column title, format)
COLUMNS = [
    ("arm", "arm", "{}"),
    ("total_params", "params", "{:,.0f}"),
    ("memory_params", "memory params", "{:,.0f}"),
    ("active_params", "active params", "{:,.0f}"),
    ("flops_per_token", "FLOPs/token", "{:,.0f}"),
    ("flops_ratio", "x dense", "{:.2f}"),
    ("final_loss", "train loss", "{:.3f}"),
    ("eval_loss", "eval loss", "{:.3f}"),
    ("recall/records", "recall records", "{:.1%}"),
    ("recall/bios", "recall bios", "{:.1%}"),
    ("recall/qa", "QA trained", "{:.1%}"),
    ("qa_heldout", "QA held-out", "{:.1%}"),
    ("bits", "bits stored", "{:,.0f}"),
    ("bits_per_param", "bits/param", "{:.3g}"),
    ("bits_per_flop", "bits per FLOP/token", "{:.3g}"),
    ("memory_usage", "memory usage", "{:.1%}"),
    ("lr", "lr", "{:.2g}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("wall_s", "wall s", "{:.0f}"),
]


# metrics of the periodic evaluations plotted against training tokens: key -> (file, y label, title, y limits)
DURING = {
    "eval/recall/records": ("recall_vs_tokens.png", "exact-match recall (records)", "Recall vs tokens", (-0.03, 1.03)),
    "eval/bits/records": ("bits_vs_tokens.png", "bits stored (records)", "Stored bits vs tokens", None),
}

# what the architecture fixes (the same for every seed): no spread is shown for these
FIXED = ("total_params", "memory_params", "active_params", "flops_per_token", "flops_ratio", "tokens", "lr")


def aggregate(runs: list[dict]) -> list[dict]:
    """Rows of (arm, seed) runs -> one row per arm, in first-seen order: every number's mean over the arm's
    seeds, with ``<key>_std`` (sample standard deviation), ``<key>_min`` and ``<key>_max``; ``seeds`` the
    count and ``runs`` the per-seed rows. A key some seed lacks (or holds None) is left out."""
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    rows = []
    for arm, arm_runs in by_arm.items():
        row = {"arm": arm, "seeds": len(arm_runs), "runs": arm_runs}
        for key in arm_runs[0]:
            values = [r.get(key) for r in arm_runs]
            if key == "seed" or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                continue
            row[key] = statistics.fmean(values)
            if len(values) > 1:
                row[f"{key}_std"] = statistics.stdev(values)
                row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
        rows.append(row)
    return rows


def format_cell(row: dict, key: str, fmt: str) -> str:
    """``fmt`` of ``row[key]``, with `` ± `` its ``_std`` when there is one (not for what the architecture fixes);
    "-" for a missing or NaN value."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    std = row.get(f"{key}_std")
    return fmt.format(value) if std is None or key in FIXED else f"{fmt.format(value)} ± {fmt.format(std)}"


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The COLUMNS that have a value in at least one row."""
    return [c for c in COLUMNS if any(format_cell(r, c[0], c[2]) != "-" for r in rows)]


def format_table(rows: list[dict]) -> str:
    """A fixed-width table, one line per arm; columns that are empty for every arm are left out."""
    columns = _columns(rows)
    cells = [[title for _, title, _ in columns]] + [[format_cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    """The same table as GitHub markdown (for the README)."""
    columns = _columns(rows)
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(format_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_tables(rows: list[dict], out_dir: str) -> list[str]:
    """Write ``results.json`` (every field), ``results.csv`` and ``results.md`` atomically; return their paths."""
    keys = sorted({k for r in rows for k in r if not isinstance(r[k], (dict, list))})
    keys = ["arm"] + [k for k in keys if k != "arm"]
    csv_text = io.StringIO()
    writer = csv.DictWriter(csv_text, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    texts = {
        "results.json": json.dumps(rows, indent=2) + "\n",
        "results.csv": csv_text.getvalue(),
        "results.md": format_markdown(rows) + "\n",
    }
    paths = []
    for name, text in texts.items():
        paths.append(os.path.join(out_dir, name))
        atomic_write(paths[-1], lambda f, text=text: f.write(text.encode()))
    return paths


def _mean_curves(ax, curves: dict[str, list[list[tuple[float, float]]]]) -> bool:
    """One line per arm: the mean over its seeds at the tokens every seed has, their range shaded. Whether
    anything was drawn."""
    drawn = False
    for arm, seeds in curves.items():
        seeds = [dict(points) for points in seeds if points]
        tokens = sorted(set.intersection(*(set(points) for points in seeds))) if seeds else []
        if not tokens:
            continue
        values = [[points[t] for points in seeds] for t in tokens]
        (line,) = ax.plot(
            tokens, [statistics.fmean(v) for v in values], label=arm, marker="." if len(tokens) < 30 else None
        )
        if len(seeds) > 1:
            ax.fill_between(
                tokens, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2
            )
        drawn = True
    return drawn


def write_plots(
    rows: list[dict],
    curves: dict[str, list[list[tuple[float, float]]]],
    out_dir: str,
    during: dict[str, dict[str, list[list[tuple[float, float]]]]] | None = None,
) -> list[str]:
    """``loss.png`` (training loss vs tokens, one line per arm: the mean over its seeds, their range shaded),
    ``recall_vs_flops.png`` (final recall of each trained format vs forward FLOPs/token, one point per
    arm, with the seeds' standard deviation as error bars) and, for the runs that evaluated periodically,
    one plot per ``DURING`` metric (the records' recall and stored bits during training, as the loss);
    return the paths.

    curves: arm -> one [(tokens seen, training loss), ...] per seed; during: metric key (of ``DURING``) ->
    curves of that metric alike.
    """
    matplotlib = require("matplotlib", "train")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _mean_curves(ax, curves)
    ax.set(xlabel="training tokens", ylabel="training loss", title="Loss vs tokens")
    ax.set_yscale("log")
    paths.append(_finish(fig, ax, os.path.join(out_dir, "loss.png")))

    for key, by_arm in (during or {}).items():
        by_arm = {arm: seeds for arm, seeds in by_arm.items() if any(len(points) > 1 for points in seeds)}
        if not by_arm:  # only the final evaluation (train.eval_every=0): no curve to draw
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if _mean_curves(ax, by_arm):
            name, ylabel, title, ylim = DURING[key]
            ax.set(xlabel="training tokens", ylabel=ylabel, title=title, ylim=ylim)
            paths.append(_finish(fig, ax, os.path.join(out_dir, name)))
        else:
            plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, marker in (("recall/records", "records", "o"), ("recall/bios", "bios", "s"),
                               ("qa_heldout", "QA held-out", "^")):  # fmt: skip
        points = [(r["flops_per_token"], r[key], r.get(f"{key}_std") or 0, r["arm"]) for r in rows
                  if r.get(key) is not None]  # fmt: skip
        if not points:
            continue
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt=marker,
                    label=label, markersize=7, capsize=3)  # fmt: skip
        for x, y, _, arm in points:
            ax.annotate(arm, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="forward FLOPs per token", ylabel="exact-match recall", title="Fact recall vs FLOPs/token",
           ylim=(-0.03, 1.03))  # fmt: skip
    paths.append(_finish(fig, ax, os.path.join(out_dir, "recall_vs_flops.png")))
    return paths


def _finish(fig, ax, path: str) -> str:
    """Grid, legend, tight layout; save ``fig`` to ``path`` and close it. Returns ``path``."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
