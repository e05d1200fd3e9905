"""Run a comparison: train every arm of a preset (reusing finished ones), then report.

    from memlayers.compare import run_compare
    rows = run_compare("cpu", "runs/compare-cpu")      # one dict per arm, also printed as a table
    rows = run_compare("cpu", "runs/compare-cpu", seeds=3)  # each arm over 3 seeds: mean ± std

Each arm trains in ``<out_dir>/<arm>/`` with ``memlayers.train.train`` (so an interrupted compare
resumes where it stopped and a finished arm is never trained twice), its further seeds in
``<out_dir>/<arm>.seed<k>/``; the outputs (``results.{json,csv,md}``, ``loss.png``, ``recall_vs_flops.png``)
go to ``out_dir``. Seed k >= 1 draws the model's init and the training order from ``train.seed + k``
(``train.seed``, ``data.order_seed``): the facts stay the same.
"""

import os
import sys
import time

from ..errors import RunError
from ..train import RunConfig, load_config, train
from ..train.lock import lock_run_dir
from ..train.plots import read_metrics
from .presets import CompareConfig, get_preset
from .report import DURING, aggregate, format_table, write_plots, write_tables
from .tuning import sweep_lrs


class ArmsFailedError(RunError, RuntimeError):
    """Some arms of a comparison failed (the others finished and are in the table)."""


def _mean_usage(evaluation: dict) -> float | None:
    """Mean effective usage (exp(-KL), weighted by |w|) over the arm's memory layers, or None."""
    values = [v for k, v in evaluation.items() if k.startswith("memory/") and k.endswith("/usage_weighted")]
    return sum(values) / len(values) if values else None


def arm_row(arm: str, result: dict, dense_flops: float | None) -> dict:
    """One table row from a finished run's ``result.json``."""
    acc, ev = result["accounting"], result["eval"]
    row = dict(
        arm=arm,
        total_params=acc["total_params"],
        memory_params=acc["memory_params"],
        active_params=acc["active_params"],
        flops_per_token=acc["flops_per_token"],
        flops_ratio=acc["flops_per_token"] / dense_flops if dense_flops else None,
        final_loss=result.get("final_loss"),
        eval_loss=ev.get("loss"),
        memory_usage=_mean_usage(ev),
        lr=result["config"]["train"]["lr"],
        tokens_per_s=result.get("tokens_per_s"),
        wall_s=result.get("wall_time"),
        tokens=result.get("tokens"),
    )
    row.update({k: v for k, v in ev.items() if k.startswith(("recall/", "qa_heldout", "bits/"))})
    bits = [v for k, v in ev.items() if k.startswith("bits/")]
    if bits:  # the facts' bits the model stores (each format holds the same facts: the best), per param and FLOP
        row["bits"] = max(bits)
        row["bits_per_param"] = row["bits"] / acc["total_params"]
        row["bits_per_flop"] = row["bits"] / acc["flops_per_token"]
    return row


def metric_curve(run_dir: str, key: str = "loss") -> list[tuple[float, float]]:
    """[(tokens, value of ``key``), ...] from a run's ``metrics.jsonl``: the training loss, or e.g.
    ``eval/recall/records`` (the periodic evaluations' recall, with ``train.eval_every`` > 0)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    records = read_metrics(path) if os.path.exists(path) else []
    return [(r["tokens"], r[key]) for r in records if key in r and "tokens" in r]


def arm_configs(
    preset: CompareConfig, overrides: list[str] = (), arms: list[str] | None = None
) -> dict[str, RunConfig]:
    """The full ``RunConfig`` of each arm (all, or those in ``arms``, in the preset's order): the preset's
    data and train sections, the arm's model, then ``overrides`` (dotlist, e.g. ``train.steps=100``)."""
    if arms is not None:
        unknown = sorted(set(arms) - set(preset.arms))
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown} for preset {preset.name!r}; its arms: {list(preset.arms)}")
    configs = {}
    for arm, model in preset.arms.items():
        if arms is None or arm in arms:
            try:
                configs[arm] = load_config(
                    None, list(overrides), base=RunConfig(model=model, data=preset.data, train=preset.train)
                )
            except ValueError as e:  # an override applies to every arm: say which one it does not fit
                raise ValueError(f"arm {arm!r}: {e} (overrides apply to every arm; pick arms with --arms)") from None
    return configs


def seed_overrides(base: int, k: int) -> list[str]:
    """The overrides of seed ``k`` of a comparison whose arms have ``train.seed`` = ``base``: none for k = 0 (the
    preset as it is), else init and training order from ``base + k``."""
    return [] if k == 0 else [f"train.seed={base + k}", f"data.order_seed={base + k}"]


def run_dir(out_dir: str, arm: str, k: int) -> str:
    return os.path.join(out_dir, arm if k == 0 else f"{arm}.seed{k}")


def run_compare(
    preset: str | CompareConfig,
    out_dir: str,
    *,
    arms: list[str] | None = None,
    overrides: list[str] = (),
    progress: bool = True,
    seeds: int = 1,
    tune_lr=None,
) -> list[dict]:
    """Train (or reuse) every arm of ``preset`` under ``out_dir``, print the table, write the files.

    arms: a subset of the preset's arms, in the preset's order (None: all of them).
    overrides: dotlist overrides applied to every arm's RunConfig (``train.steps=100``).
    progress: print each arm's name and let ``train.progress`` show its bar; False: quiet.
    seeds: train each arm this many times (``seed_overrides``); the rows are then means over the seeds with
        their spread (``report.aggregate``).
    tune_lr: learning-rate factors (e.g. ``LR_FACTORS``) for a short sweep per arm first (``tuning.sweep_lrs``);
        every seed of an arm then trains at the arm's chosen lr. None: the preset's lr for every arm.
    Returns one row (dict) per arm. An arm that fails does not stop the others: the table and files
    are written for the arms that finished, then a RuntimeError names the failed arms and why (if
    every arm failed, the first one's error is raised as it was).
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    preset = get_preset(preset) if isinstance(preset, str) else preset
    configs = arm_configs(preset, overrides, arms)
    base = next(iter(configs.values())).train.seed
    runs = {(arm, 0): cfg for arm, cfg in configs.items()}
    for k in range(1, seeds):
        runs.update(
            {(arm, k): cfg for arm, cfg in arm_configs(preset, [*overrides, *seed_overrides(base, k)], arms).items()}
        )
    os.makedirs(out_dir, exist_ok=True)
    with lock_run_dir(out_dir):  # one comparison per directory (each arm's run also locks its own)
        if tune_lr is not None:
            lrs = sweep_lrs(configs, out_dir, tune_lr, progress=progress)
            runs = {(arm, k): load_config(None, [f"train.lr={lrs[arm]!r}"], base=cfg) for (arm, k), cfg in runs.items()}
        return _run_arms(preset, runs, out_dir, progress, seeds, overrides)


def _run_arms(preset: CompareConfig, runs: dict, out_dir: str, progress: bool, seeds: int, overrides=()) -> list[dict]:
    start = time.perf_counter()
    results, failed = {}, {}
    for i, ((arm, k), cfg) in enumerate(sorted(runs.items(), key=lambda item: item[0][1])):
        name = arm if seeds == 1 else f"{arm} (seed {k + 1} of {seeds})"
        if progress:
            print(f"[{i + 1}/{len(runs)}] {name}", flush=True)
        try:
            results[arm, k] = train(cfg, run_dir(out_dir, arm, k), progress=None if progress else False)
        except Exception as e:  # noqa: BLE001 (one arm running out of memory must not cost the others)
            failed[name] = e
            why = f"{type(e).__name__}: {e}"
            print(f"arm {name!r} failed ({why}); going on with the others", file=sys.stderr, flush=True)
    if failed and not results:
        raise next(iter(failed.values()))
    dense = next((r for (arm, _), r in results.items() if arm == "dense"), None)
    dense_flops = dense["accounting"]["flops_per_token"] if dense else None
    order = {arm: i for i, (arm, _) in enumerate(runs)}  # the preset's order of the arms
    finished = sorted(results.items(), key=lambda item: (order[item[0][0]], item[0][1]))
    rows = [{**arm_row(arm, result, dense_flops), "seed": result["config"]["train"]["seed"]}
            for (arm, _), result in finished]  # fmt: skip
    if seeds > 1:
        rows = aggregate(rows)
    write_tables(rows, out_dir)
    curves = {key: {} for key in ("loss", *DURING)}  # metric -> arm -> one curve per seed
    for (arm, k), _ in finished:
        for key, by_arm in curves.items():
            by_arm.setdefault(arm, []).append(metric_curve(run_dir(out_dir, arm, k), key))
    write_plots(rows, curves.pop("loss"), out_dir, curves)
    print(f"\npreset {preset.name!r}: {preset.description}")
    if overrides:
        print(f"with every arm's overrides: {' '.join(overrides)}")
    if seeds > 1:
        print(f"mean ± standard deviation over {seeds} seeds (min and max in results.json)")
    print(format_table(rows))
    print(f"\n{len(results)} runs in {time.perf_counter() - start:.0f} s (finished runs reused); outputs in {out_dir}/")
    if failed:
        raise ArmsFailedError(
            f"{len(failed)} arm(s) failed, the table above leaves them out: "
            + "; ".join(f"{arm}: {type(e).__name__}: {e}" for arm, e in failed.items())
            + ". Fix the cause and rerun the same command: finished arms are reused, interrupted ones resume."
        )
    return rows
