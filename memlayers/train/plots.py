"""A run's curves as one PNG: training (and validation) loss, and fact recall, against training tokens.

    write_curves("runs/a/metrics.jsonl", "runs/a/curves.png")   # what ``memlayers train`` does at the end
"""

import io
import json
import os
from collections import defaultdict

from .._extras import require
from .checkpoint import atomic_write

CURVES = "curves.png"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def write_curves(metrics: str | os.PathLike, out: str | os.PathLike) -> None:
    """Plot ``metrics`` (a metrics.jsonl) to ``out``, atomically: loss vs tokens (training loss and
    ``eval/loss``) on the left, every ``eval/recall/<format>`` and ``eval/qa_heldout`` on the right
    (when the run has any)."""
    matplotlib = require("matplotlib", "train")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)  # name -> [(tokens, value)]
    for r in read_metrics(metrics):
        for key in ("loss", "eval/loss"):
            if r.get(key) is not None:
                series[key].append((r["tokens"], r[key]))
        for key, value in r.items():
            recall = key.count("/") == 2 and key.startswith("eval/recall/") or key == "eval/qa_heldout"
            if value is not None and recall:
                series[key.removeprefix("eval/")].append((r["tokens"], value))
    recalls = [k for k in series if k not in ("loss", "eval/loss")]
    fig, axes = plt.subplots(1, 2 if recalls else 1, figsize=(12 if recalls else 7, 4.5), squeeze=False)
    left = axes[0][0]
    for key, label in (("loss", "training loss"), ("eval/loss", "validation loss")):
        if series[key]:
            left.plot(*zip(*series[key]), label=label, marker="o" if key == "eval/loss" else None)
    left.set(xlabel="training tokens", ylabel="loss (nats/token)", title="Loss")
    if recalls:
        right = axes[0][1]
        for key in recalls:
            right.plot(*zip(*series[key]), label=key, marker="o")
        right.set(xlabel="training tokens", ylabel="exact-match recall", title="Recall", ylim=(-0.03, 1.03))
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out, lambda f: f.write(buffer.getvalue()))
