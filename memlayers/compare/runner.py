"""Run a comparison: train every arm of a preset (reusing finished ones), then report.

    from memlayers.compare import run_compare
    rows = run_compare("cpu", "runs/compare-cpu")      # one dict per arm, also printed as a table

Each arm trains in ``<out_dir>/<arm>/`` with ``memlayers.train.train`` (so an interrupted compare
resumes where it stopped and a finished arm is never trained twice); the outputs
(``results.{json,csv,md}``, ``loss.png``, ``recall_vs_flops.png``) go to ``out_dir``.
"""

import os
import sys
import time

from ..errors import RunError
from ..train import RunConfig, load_config, train
from ..train.lock import lock_run_dir
from ..train.plots import read_metrics
from .presets import CompareConfig, get_preset
from .report import format_table, write_plots, write_tables


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
        tokens_per_s=result.get("tokens_per_s"),
        wall_s=result.get("wall_time"),
        tokens=result.get("tokens"),
    )
    row.update({k: v for k, v in ev.items() if k.startswith(("recall/", "qa_heldout"))})
    return row


def loss_curve(run_dir: str) -> list[tuple[float, float]]:
    """[(tokens, training loss), ...] from a run's ``metrics.jsonl`` (training records only)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    records = read_metrics(path) if os.path.exists(path) else []
    return [(r["tokens"], r["loss"]) for r in records if "loss" in r and "tokens" in r]


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


def run_compare(
    preset: str | CompareConfig,
    out_dir: str,
    *,
    arms: list[str] | None = None,
    overrides: list[str] = (),
    progress: bool = True,
) -> list[dict]:
    """Train (or reuse) every arm of ``preset`` under ``out_dir``, print the table, write the files.

    arms: a subset of the preset's arms, in the preset's order (None: all of them).
    overrides: dotlist overrides applied to every arm's RunConfig (``train.steps=100``).
    progress: print each arm's name and let ``train.progress`` show its bar; False: quiet.
    Returns one row (dict) per arm. An arm that fails does not stop the others: the table and files
    are written for the arms that finished, then a RuntimeError names the failed arms and why (if
    every arm failed, the first one's error is raised as it was).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    configs = arm_configs(preset, overrides, arms)
    os.makedirs(out_dir, exist_ok=True)
    with lock_run_dir(out_dir):  # one comparison per directory (each arm's run also locks its own)
        return _run_arms(preset, configs, out_dir, progress)


def _run_arms(preset: CompareConfig, configs: dict[str, RunConfig], out_dir: str, progress: bool) -> list[dict]:
    start = time.perf_counter()
    results, failed = {}, {}
    for i, (arm, cfg) in enumerate(configs.items()):
        if progress:
            print(f"[{i + 1}/{len(configs)}] {arm}", flush=True)
        try:
            results[arm] = train(cfg, os.path.join(out_dir, arm), progress=None if progress else False)
        except Exception as e:  # noqa: BLE001 (one arm running out of memory must not cost the others)
            failed[arm] = e
            why = f"{type(e).__name__}: {e}"
            print(f"arm {arm!r} failed ({why}); going on with the others", file=sys.stderr, flush=True)
    if failed and not results:
        raise next(iter(failed.values()))
    dense = results.get("dense")
    dense_flops = dense["accounting"]["flops_per_token"] if dense else None
    rows = [arm_row(arm, result, dense_flops) for arm, result in results.items()]
    write_tables(rows, out_dir)
    write_plots(rows, {arm: loss_curve(os.path.join(out_dir, arm)) for arm in results}, out_dir)
    print(f"\npreset {preset.name!r}: {preset.description}")
    print(format_table(rows))
    print(f"\n{len(rows)} arms in {time.perf_counter() - start:.0f} s (finished arms reused); outputs in {out_dir}/")
    if failed:
        raise ArmsFailedError(
            f"{len(failed)} arm(s) failed, the table above leaves them out: "
            + "; ".join(f"{arm}: {type(e).__name__}: {e}" for arm, e in failed.items())
            + ". Fix the cause and rerun the same command: finished arms are reused, interrupted ones resume."
        )
    return rows
