"""The ``memlayers`` command line (the console script ``memlayers = memlayers.cli:main``).

Subcommands: ``demo`` (see ``memlayers.demo``).

    memlayers demo                         # fit a memory layer to 4096 Zipf-sampled facts on CPU
    memlayers demo --facts 8192 --steps 1000 --value-optimizer sparse_adam
    memlayers --version
"""

import argparse
import json
import math

from . import __version__
from .config import PRESETS
from .demo import DemoConfig, run_demo
from .optim import VALUE_OPTIMIZERS


def _number(kind, low, low_ok=True):
    """An argparse type: ``kind`` (int or float), finite, >= low (or > low when not ``low_ok``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if low_ok else '>'} {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memlayers", description="Trainable sparse key-value memory layers for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"memlayers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="fit a memory layer to a synthetic fact-recall task on CPU (~30 s)",
        description="Fit classifier(MemoryLayer(x)) to random facts sampled with Zipf frequencies, "
        "beside a dense MLP of the same FLOPs/token; print recall (all facts, head, tail) and usage metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.set_defaults(subparser=demo)  # for errors found after parsing
    pos_int, pos_float, nonneg_float = _number(int, 1), _number(float, 0, low_ok=False), _number(float, 0)
    task = demo.add_argument_group("task")
    task.add_argument("--facts", type=pos_int, default=d.facts, help="number of facts (key -> class pairs)")
    task.add_argument("--classes", type=_number(int, 2), default=d.classes, help="number of target classes")
    task.add_argument("--dim", type=_number(int, 4), default=d.dim, help="width of inputs and of the memory layer")
    task.add_argument("--zipf", type=nonneg_float, default=d.zipf, help="Zipf exponent of fact frequency (0: uniform)")
    task.add_argument("--offset", type=nonneg_float, default=d.offset, help="norm of the offset shared by all inputs")
    mem = demo.add_argument_group("memory layer")
    mem.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="memlayers.preset to scale down")
    mem.add_argument("--n-keys", type=pos_int, default=d.n_keys, help="sub-keys per half (N = n_keys^2 slots)")
    mem.add_argument("--heads", type=pos_int, default=d.heads, help="retrieval heads")
    mem.add_argument("--topk", type=pos_int, default=d.topk, help="slots read per head")
    train = demo.add_argument_group("training")
    train.add_argument("--steps", type=pos_int, default=d.steps, help="training steps")
    train.add_argument("--batch-size", type=pos_int, default=d.batch_size, help="facts per step")
    train.add_argument("--lr", type=pos_float, default=d.lr, help="base learning rate of the memory model")
    train.add_argument("--value-lr-ratio", type=pos_float, default=d.value_lr_ratio, help="value lr / base lr")
    train.add_argument("--value-optimizer", choices=VALUE_OPTIMIZERS, default=d.value_optimizer,
                       help="dense AdamW on the value table, or row-sparse lazy Adam")  # fmt: skip
    train.add_argument("--baseline-lr", type=pos_float, default=d.baseline_lr, help="learning rate of the dense MLP")
    train.add_argument("--no-baseline", action="store_true", help="skip the dense MLP baseline")
    train.add_argument("--eval-every", type=pos_int, default=d.eval_every, help="steps between recall evaluations")
    train.add_argument("--seed", type=int, default=d.seed, help="seed of the task, the init and the batches")
    train.add_argument("--threads", type=pos_int, default=None, help="torch threads; None means every available CPU")
    out = demo.add_argument_group("output")
    out.add_argument("--quiet", action="store_true", help="no progress bars (the final table is still printed)")
    out.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            cfg = DemoConfig(
                facts=args.facts, classes=args.classes, dim=args.dim, zipf=args.zipf, offset=args.offset,
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, value_lr_ratio=args.value_lr_ratio,
                preset=args.preset, n_keys=args.n_keys, heads=args.heads, topk=args.topk,
                value_optimizer=args.value_optimizer, baseline=not args.no_baseline, baseline_lr=args.baseline_lr,
                eval_every=args.eval_every, seed=args.seed, threads=args.threads,
            )  # fmt: skip
        except ValueError as e:
            args.subparser.error(str(e))  # exits with status 2
        results = run_demo(cfg, progress=not args.quiet)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
