"""``memlayers experiment utilisation``: do product-key memories lose sub-keys the way VQ codebooks lose codes, and
which remedy helps? Every arm (the baseline, each remedy alone, all together) over several seeds on two tasks:

* ``skewed``: the regression of ``skewed_task`` (inputs with a large shared mean: the baseline collapses);
* ``text``: a byte-level language model (2 blocks, width 128; the second block's FFN is a memory of 128^2
  slots) on local text, by default the top-level modules of this Python's standard library.

    from memlayers.experiments.utilisation import run_utilisation
    tables = run_utilisation("runs/utilisation", tasks=("skewed",), seeds=3)

Finished (task, arm, seed) runs are reused: a skewed run is one JSON file, a text run a training run
directory (an interrupted one resumes). Writes ``<task>/results.{json,md}`` and ``<task>/usage.png`` (the
usage metrics over training, mean over seeds) and prints one table per task with the decision rule's verdict.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

from .._extras import require
from ..compare.report import aggregate, format_cell
from ..train import atomic_write, load_config, train
from ..train.plots import read_metrics
from .skewed_task import CURVE_KEYS, USAGE_KEYS, SkewedTask, train_arm

RESTART = {"key_restart": 0.1, "restart_every": 100}
BALANCE = {"balance_loss": 0.01, "balance_tau": 1.0}
ARMS = {
    "baseline": {},
    "batchnorm": {"query_norm": "batchnorm"},
    "whiten": {"query_norm": "whiten"},
    "rmsnorm_half": {"query_norm": "rmsnorm_half"},
    "kmeans": {"key_init": "kmeans"},
    "restart": RESTART,
    "balance": BALANCE,
    "simvq": {"key_param": "simvq"},
    "frozen": {"key_param": "frozen"},
    # every remedy that combines (SimVQ's shared map and restarts of single keys do not)
    "all": {"query_norm": "whiten", "key_init": "kmeans", **RESTART, **BALANCE},
}
TASKS = ("skewed", "text")


@dataclass
class TextTask:
    """The language-model task: a ``memlayers:text_bytes`` model of ``n_layers`` blocks of width ``dim`` whose block
    ``memory_block`` has a memory (``layer``: its baseline options) instead of an FFN; training length and batch;
    corpus (None: the top-level modules of this Python's standard library); evaluation points (the validation
    loss of the first 256 held-out sequences, and the memory's usage over the last ~100 training steps)."""

    steps: int = 600
    dim: int = 128
    n_layers: int = 2
    memory_block: int = 1
    layer: tuple = (("n_keys", 128), ("heads", 4), ("topk", 16))
    batch_size: int = 8
    seq_len: int = 256
    corpus: tuple[str, ...] | None = None
    eval_every: int = 100


@dataclass
class Preset:
    skewed: SkewedTask
    text: TextTask


PRESETS = {
    "cpu": Preset(SkewedTask(), TextTask()),
    # one H100/H200 (``reference/sparse_update.md``, "GPU"): wider and deeper, a 1024^2 memory. Not measured yet;
    # every arm over 3 seeds is far more than a 10-minute device session: pick arms and seeds (--arms, --seeds 1)
    "gpu": Preset(
        SkewedTask(
            facts=65536, dim=256, out=64, steps=3000, batch=8192, layer=dict(n_keys=1024, heads=4, topk=32, key_dim=128)
        ),  # fmt: skip
        TextTask(
            steps=600,
            dim=512,
            n_layers=6,
            memory_block=2,
            batch_size=64,
            seq_len=512,
            layer=(("n_keys", 1024), ("heads", 4), ("topk", 32), ("key_dim", 256)),
        ),  # fmt: skip
    ),
}

# rule for making a remedy a default (the issue's): the loss better than the baseline's by more than 2 sigma
# (sigma: the larger of the two arms' seed standard deviations), effective usage up >= 20%, step time up <= 3%
RULE = {"sigmas": 2.0, "usage_gain": 0.20, "time_cost": 0.03}


def stdlib_corpus() -> list[str]:
    """The top-level ``*.py`` modules of this Python's standard library (about 5 MB): text on every machine."""
    return [os.path.join(os.path.dirname(os.__file__), "*.py")]


def text_config(task: TextTask, options: dict, seed: int):
    """The ``RunConfig`` of one text arm (``memlayers:text_bytes`` resized to the task)."""
    layer = {**dict(task.layer), "query_norm": "none", **options}
    corpus = list(task.corpus) if task.corpus else stdlib_corpus()
    overrides = [
        f"model.dim={task.dim}",
        f"model.n_layers={task.n_layers}",
        f"model.max_seq_len={task.seq_len}",
        f"model.memories=[{{layers: '{task.memory_block}', preset: memory, options: {json.dumps(layer)}}}]",
        f"data.text.paths={json.dumps(corpus)}",
        f"train.steps={task.steps}",
        f"train.batch_size={task.batch_size}",
        f"train.seq_len={task.seq_len}",
        f"train.warmup={max(1, task.steps // 10)}",
        f"train.eval_every={task.eval_every}",
        f"train.ckpt_every={task.eval_every}",
        f"train.seed={seed}",
        f"data.order_seed={seed}",
        "train.log_every=50",
    ]
    return load_config("memlayers:text_bytes", overrides)


def _run_skewed(task: SkewedTask, arm: str, seed: int, path: str, show: bool) -> dict:
    settings = {"task": asdict(task), "options": ARMS[arm]}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(
                f"{path} was trained with other settings (task or arm options); use another --out, or delete it "
                "to train it again"
            )
        return saved
    tqdm = require("tqdm", "train").tqdm
    bar = tqdm(total=task.steps, desc=f"skewed/{arm}.seed{seed}", leave=False, disable=not show, unit="step")
    result = train_arm(task, ARMS[arm], seed, progress=bar.update)
    bar.close()
    out = {"arm": arm, "seed": seed, **result["final"], "step_ms": result["step_ms"], "restarts": result["restarts"],
           "curve": result["curve"], "settings": settings}  # fmt: skip
    atomic_write(path, lambda f: f.write((json.dumps(out, indent=1) + "\n").encode()))
    return out


def _memory_metrics(record: dict, prefix: str) -> dict:
    """The first memory layer's usage metrics in a record with keys ``<prefix>memory/<block>/<name>``."""
    keys = [k for k in record if k.startswith(prefix + "memory/")]
    block = keys[0].split("/")[-2] if keys else None
    return {k.split("/")[-1]: record[k] for k in keys if k.split("/")[-2] == block}


def _run_text(task: TextTask, arm: str, seed: int, run_dir: str, show: bool) -> dict:
    cfg = text_config(task, ARMS[arm], seed)
    cfg.train.progress = show
    result = train(cfg, run_dir)
    usage = _memory_metrics(result["eval"], "")
    curve = []
    for record in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        metrics = _memory_metrics(record, "eval/")
        if metrics and "eval/loss" in record:
            curve.append({"step": record["step"], "loss": record["eval/loss"], **{k: metrics[k] for k in CURVE_KEYS}})
    return {
        "arm": arm,
        "seed": seed,
        "loss": result["eval"]["loss"],
        **{k: usage.get(k) for k in USAGE_KEYS},
        "step_ms": 1000 * result["train_time"] / result["steps"] if result.get("train_time") else None,
        "curve": curve,
    }


# (key, title) of the loss columns (4 decimals); the first is what the decision rule compares
COLUMNS = {
    "skewed": [("mse", "loss (MSE)"), ("tail_mse", "tail MSE")],
    "text": [("loss", "eval loss (nats/byte)")],
}
USAGE_COLUMNS = [
    ("coverage_ratio", "coverage/ideal", "{:.1%}"),
    ("usage_weighted", "eff. usage", "{:.2%}"),
    ("subkey_kl_first", "KL half 1", "{:.3f}"),
    ("subkey_kl_second", "KL half 2", "{:.3f}"),
    ("dead_subkeys", "dead sub-keys", "{:.1%}"),
    ("effective_k", "eff. k", "{:.2f}"),
    ("step_ms", "step ms", "{:.1f}"),
]


def _loss_key(task: str) -> str:
    return COLUMNS[task][0][0]


def verdict(row: dict, base: dict, loss_key: str) -> str:
    """Whether ``row`` passes ``RULE`` against the baseline row ``base`` (both aggregated over seeds): "default",
    or "no: " and the criteria it misses; "n/a" without a spread (one seed) or a missing number."""
    keys = (loss_key, f"{loss_key}_std", "usage_weighted", "step_ms")
    if any(not isinstance(r.get(k), (int, float)) for r in (row, base) for k in keys):
        return "n/a (needs >= 2 seeds and every metric)"
    sigma = max(row[f"{loss_key}_std"], base[f"{loss_key}_std"])
    marks = [
        ("loss", base[loss_key] - row[loss_key] > RULE["sigmas"] * sigma),
        ("usage", row["usage_weighted"] >= (1 + RULE["usage_gain"]) * base["usage_weighted"]),
        ("time", row["step_ms"] <= (1 + RULE["time_cost"]) * base["step_ms"]),
    ]
    return "default" if all(ok for _, ok in marks) else "no: " + ", ".join(f"{k} x" for k, ok in marks if not ok)


def format_markdown(task: str, rows: list[dict]) -> str:
    """One line per arm: the loss with its spread, usage metrics, step time and the rule's verdict."""
    columns = [(k, title, "{:.4f}") for k, title in COLUMNS[task]] + [
        c for c in USAGE_COLUMNS if any(r.get(c[0]) is not None for r in rows)
    ]
    base = next((r for r in rows if r["arm"] == "baseline"), None)

    head = ["arm", *[title for _, title, _ in columns], "seeds"] + (["rule"] if base else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in rows:
        cells = [row["arm"], *[format_cell(row, k, f) for k, _, f in columns], str(row["seeds"])]
        if base:
            cells.append("(baseline)" if row is base else verdict(row, base, _loss_key(task)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_usage_plot(task: str, runs: list[dict], path: str) -> str:
    """``usage.png``: loss, effective usage, coverage/ideal and dead sub-keys over training steps, one line per
    arm (the mean over its seeds)."""
    matplotlib = require("matplotlib", "train")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("usage_weighted", "effective usage e^-KL"),
              ("coverage_ratio", "coverage / ideal"), ("dead_subkeys", "dead sub-keys")]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    for ax, (key, title) in zip(axes.flat, panels):
        for arm in arms:
            curves = [r["curve"] for r in runs if r["arm"] == arm and r["curve"]]
            steps = sorted(set.intersection(*(set(p["step"] for p in c) for c in curves))) if curves else []
            values = [statistics.fmean(p[key] for c in curves for p in c if p["step"] == s) for s in steps]
            ax.plot(steps, values, label=arm, linestyle="--" if arm == "baseline" else "-")
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"utilisation: {task} (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_utilisation(
    out_dir: str,
    tasks=TASKS,
    arms=None,
    seeds: int = 3,
    preset: str = "cpu",
    show: bool = True,
    steps: int | None = None,
    skewed: SkewedTask | None = None,
    text: TextTask | None = None,
) -> dict[str, list[dict]]:
    """Run (or reuse) every (task, arm, seed); write and print the tables; return {task: aggregated rows}.

    arms: names from ``ARMS`` (default all); preset: "cpu" or "gpu" (``PRESETS``); steps: every run's training
    steps (None: the preset's); skewed/text: replace the preset's task settings."""
    if preset not in PRESETS:
        raise ValueError(f"experiment utilisation: unknown preset {preset!r}; choose one of {tuple(PRESETS)}")
    arms = list(ARMS) if arms is None else list(arms)
    unknown = [a for a in arms if a not in ARMS] + [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(
            f"experiment utilisation: unknown {', '.join(map(repr, unknown))}; arms are {', '.join(ARMS)}, "
            f"tasks {', '.join(TASKS)}"
        )
    if seeds < 1:
        raise ValueError(f"experiment utilisation: seeds must be >= 1, got {seeds}")
    settings = {"skewed": skewed or PRESETS[preset].skewed, "text": text or PRESETS[preset].text}
    if steps is not None:
        if steps < 1:
            raise ValueError(f"experiment utilisation: steps must be >= 1, got {steps}")
        t = settings["text"]
        settings = {"skewed": replace(settings["skewed"], steps=steps),
                    "text": replace(t, steps=steps, eval_every=min(t.eval_every, steps))}  # fmt: skip
    tables = {}
    for task in tasks:
        task_dir = os.path.join(out_dir, task)
        os.makedirs(task_dir, exist_ok=True)
        runs = []
        for arm in arms:
            for seed in range(seeds):
                tic = time.perf_counter()
                name = f"{arm}.seed{seed}"
                if task == "skewed":
                    run = _run_skewed(settings[task], arm, seed, os.path.join(task_dir, name + ".json"), show)
                else:
                    run = _run_text(settings[task], arm, seed, os.path.join(task_dir, name), show)
                runs.append(run)
                if show:
                    loss = run[_loss_key(task)]
                    print(f"{task}/{name}: loss {loss:.4f} ({time.perf_counter() - tic:.0f} s)", file=sys.stderr)
        rows = aggregate([{k: v for k, v in r.items() if k != "curve"} for r in runs])
        table = format_markdown(task, rows)
        atomic_write(os.path.join(task_dir, "results.json"), lambda f: f.write(json.dumps(rows, indent=1).encode()))
        atomic_write(os.path.join(task_dir, "results.md"), lambda f: f.write((table + "\n").encode()))
        write_usage_plot(task, runs, os.path.join(task_dir, "usage.png"))
        print(f"\n{task} ({seeds} seed{'s' if seeds > 1 else ''}, preset {preset}):\n{table}")
        tables[task] = rows
    return tables


__all__ = ["ARMS", "PRESETS", "RULE", "SkewedTask", "TextTask", "run_utilisation"]
