"""Each arm's learning rate chosen by the same short sweep (``memlayers compare --tune-lr``).

Every arm trains for ``fraction`` of the preset's steps (warmup scaled alike, no periodic evaluation) at
``lr = preset lr * factor`` for each factor, in ``<out>/lr_sweep/<arm>.lr<factor>/``. The factor whose run ends
with the lowest validation loss (the data's held-out text; never the recall the table reports) wins; a run that
diverges loses; ties go to the factor nearest 1. The sweep is written to ``<out>/lr_sweep.{json,md}``; finished
sweep runs are reused. The value tables' lr moves with it (``value_lr_ratio`` times the lr).
"""

import json
import math
import os
import sys

from ..train import RunConfig, atomic_write, load_config, train
from ..train.checkpoint import NonFiniteError

LR_FACTORS = (0.25, 0.5, 1.0, 2.0)
SWEEP_FRACTION = 0.25
EXTEND = 2  # at most this many factors added past an edge of the grid, per arm


def sweep_config(cfg: RunConfig, factor: float, fraction: float) -> RunConfig:
    """``cfg`` at ``factor`` times its lr, for ``fraction`` of its steps (and warmup)."""
    t = cfg.train
    steps = max(1, round(t.steps * fraction))
    overrides = [f"train.lr={t.lr * factor!r}", f"train.steps={steps}", f"train.warmup={round(t.warmup * fraction)}",
                 "train.eval_every=0", f"train.ckpt_every={steps}"]  # fmt: skip
    return load_config(None, overrides, base=cfg)


def sweep_lrs(
    configs: dict[str, RunConfig],
    out_dir: str,
    factors=LR_FACTORS,
    fraction: float = SWEEP_FRACTION,
    progress: bool = True,
) -> dict[str, float]:
    """Run (or reuse) the sweep of every arm in ``configs``; write ``lr_sweep.{json,md}``; return {arm: chosen lr}."""
    factors = sorted(float(f) for f in factors)
    if not factors or any(not (f > 0 and math.isfinite(f)) for f in factors):
        raise ValueError(f"--tune-lr: learning-rate factors must be positive numbers, got {factors}")
    if not 0 < fraction <= 1:
        raise ValueError(f"the sweep's fraction of the steps must be in (0, 1], got {fraction}")
    table, chosen = {}, {}
    for arm, cfg in configs.items():

        def loss_at(factor: float) -> float:
            if progress:
                print(f"lr sweep: {arm} at {factor:g} x lr", flush=True)
            run_dir = os.path.join(out_dir, "lr_sweep", f"{arm}.lr{factor:g}")
            try:
                result = train(sweep_config(cfg, factor, fraction), run_dir, progress=None if progress else False)
            except NonFiniteError as e:
                print(f"lr sweep: {arm} at {factor:g} x lr diverged ({e}); it loses", file=sys.stderr, flush=True)
                return math.inf
            loss = result["eval"].get("loss")
            if loss is None:
                raise ValueError(f"lr sweep: arm {arm!r} has no validation loss to choose by (no held-out text?)")
            return loss if math.isfinite(loss) else math.inf

        losses = extend_grid({f: loss_at(f) for f in factors}, loss_at,
                             lambda r: None if math.isinf(r[_best(r)]) else _best(r))  # fmt: skip
        best = _best(losses)
        if math.isinf(losses[best]):
            raise ValueError(f"lr sweep: every learning rate tried for arm {arm!r} diverged; try smaller factors")
        chosen[arm] = cfg.train.lr * best
        finite = {f"{f:g}": None if math.isinf(v) else v for f, v in sorted(losses.items())}  # None: diverged
        table[arm] = {"base_lr": cfg.train.lr, "losses": finite, "factor": best, "lr": chosen[arm]}
    _write(table, sorted({f for row in table.values() for f in map(float, row["losses"])}), fraction, out_dir)
    return chosen


def extend_grid(results: dict, measure, best, extend: int = EXTEND) -> dict:
    """Extend a sweep past a winning edge: while ``best(results)`` (the winning value of ``{value: result}``, or None
    to stop) is the smallest or largest value tried, add ``measure(value)`` one grid step further (the ratio of the
    two outermost values, rounded to 6 significant digits, as run directories and tables name it), at most
    ``extend`` times. Returns ``results``."""
    for _ in range(extend):
        winner, tried = best(results), sorted(results)
        if winner is None or len(tried) < 2 or winner not in (tried[0], tried[-1]):
            break
        new = winner * tried[0] / tried[1] if winner == tried[0] else winner * tried[-1] / tried[-2]
        new = float(f"{new:.6g}")
        results[new] = measure(new)
    return results


def _best(losses: dict[float, float]) -> float:
    """The factor with the lowest loss; ties to the one nearest 1."""
    return min(losses, key=lambda f: (losses[f], abs(math.log(f))))


def _write(table: dict, factors: list[float], fraction: float, out_dir: str) -> None:
    head = "| arm | " + " | ".join(f"{f:g} x lr" for f in factors) + " | chosen lr |"
    lines = [f"validation loss after {fraction:g} of the steps; **bold**: the lowest (chosen)", "", head,
             "|---|" + "---:|" * (len(factors) + 1)]  # fmt: skip
    for arm, row in table.items():
        cells = []
        for f in factors:
            loss = row["losses"].get(f"{f:g}", "-")  # "-": not tried for this arm
            text = "diverged" if loss is None else loss if loss == "-" else f"{loss:.4f}"
            cells.append(f"**{text}**" if f == row["factor"] else text)
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {row['lr']:.3g} |")
    text = json.dumps({"fraction": fraction, "factors": factors, "arms": table}, indent=1)
    atomic_write(os.path.join(out_dir, "lr_sweep.json"), lambda f: f.write((text + "\n").encode()))
    atomic_write(os.path.join(out_dir, "lr_sweep.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
