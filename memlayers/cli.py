"""The ``memlayers`` command line (the console script ``memlayers = memlayers.cli:main``).

Subcommands:

    memlayers compare                      # dense vs MoE vs Memory vs Memory+ at matched FLOPs (CPU, <10 min)
    memlayers compare --preset cpu_family  # the memory kinds: Memory+, PEER, UltraMem v1/v2, engram vs dense
    memlayers compare --preset gpu --out runs/gpu train.steps=3000
    memlayers compare --seeds 3            # every arm over 3 seeds: mean ± std
    memlayers train --config run.yaml --out runs/a train.lr=3e-4   # one run (YAML + key=value overrides)
    memlayers train --config memlayers:facts_memory_plus --out runs/b  # an example config shipped with memlayers
    memlayers eval runs/a                  # recall, QA, loss and memory usage of a checkpoint
    memlayers eval runs/a --probes facts.jsonl   # + recall of your own {"prompt", "answer"} lines
    memlayers generate runs/a "prompt"     # sample a continuation (KV cache; --temperature, --top-k, --top-p)
    memlayers lm-eval runs/a --tasks my_task --include-path my_tasks/   # lm-evaluation-harness tasks
    memlayers export runs/a model.safetensors    # the model (of any checkpoint) as one safetensors file
    memlayers experiment continual         # learning new facts: full / LoRA / memory / sparse memory finetuning
    memlayers demo                         # a lone memory layer memorises 4096 Zipf-sampled facts (~30 s)
    memlayers --version
"""

import argparse
import json
import math
import os
import sys

from . import __version__
from ._extras import missing_extra
from .demo import DemoConfig, demo_presets, run_demo
from .errors import RunError
from .generate_cli import generate_command
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
    mem.add_argument("--preset", choices=demo_presets(), default=d.preset, help="memlayers.preset to scale down")
    mem.add_argument("--n-keys", type=pos_int, default=d.n_keys, help="sub-keys per half (N = n_keys^2 slots)")
    mem.add_argument("--heads", type=pos_int, default=d.heads, help="retrieval heads")
    mem.add_argument("--topk", type=pos_int, default=d.topk, help="slots read per head")
    train = demo.add_argument_group("training")
    train.add_argument("--steps", type=pos_int, default=d.steps, help="training steps")
    train.add_argument("--batch-size", type=pos_int, default=d.batch_size, help="facts per step")
    train.add_argument("--lr", type=pos_float, default=d.lr, help="base learning rate of the memory model")
    train.add_argument("--value-lr-ratio", type=pos_float, default=d.value_lr_ratio,
                       help="value lr / base lr (default: the value optimizer's own; 10 for Adam)")  # fmt: skip
    train.add_argument("--value-optimizer", choices=VALUE_OPTIMIZERS, default=d.value_optimizer,
                       help="dense AdamW on the value table, or a row-sparse optimizer")  # fmt: skip
    train.add_argument("--baseline-lr", type=pos_float, default=d.baseline_lr, help="learning rate of the dense MLP")
    train.add_argument("--no-baseline", action="store_true", help="skip the dense MLP baseline")
    train.add_argument("--eval-every", type=pos_int, default=d.eval_every, help="steps between recall evaluations")
    train.add_argument("--seed", type=int, default=d.seed, help="seed of the task, the init and the batches")
    train.add_argument("--threads", type=pos_int, default=None, help="torch threads; None means every available CPU")
    out = demo.add_argument_group("output")
    out.add_argument("--quiet", action="store_true", help="no progress bars (the final table is still printed)")
    out.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")

    overrides = dict(nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=500 model.dim=256")
    tr = sub.add_parser(
        "train",
        help="train one model (YAML config + overrides); resumes an interrupted run",
        description="Train a memlayers.model.Transformer on synthetic facts or local text. The run directory holds "
        "config.yaml, metrics.jsonl, checkpoint.pt and, when finished, result.json; rerunning the same command "
        "resumes exactly where it stopped.",
    )
    tr.add_argument("--config", metavar="YAML", help="a run config (sections model, data, train), or memlayers:NAME "
                    "for an example shipped with memlayers (memlayers:facts_memory_plus, memlayers:text_bytes); "
                    "default: the defaults, a dense model on 1,000 people's facts")  # fmt: skip
    tr.add_argument("--out", metavar="DIR", default="runs/train", help="run directory (default: runs/train)")
    tr.add_argument("--force", action="store_true", help="start over (the old files move to DIR/prev/<n>/)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    tr.add_argument("overrides", **overrides)

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: loss, fact recall per format and attribute, held-out QA, memory usage",
        description="Evaluate a run directory or checkpoint file written by `memlayers train` or `memlayers compare`.",
    )
    ev.add_argument("checkpoint", help="a run directory, its checkpoint.pt, or an exported .safetensors file")
    ev.add_argument("--limit", type=pos_int, default=None, help="at most this many probes per format (default: all)")
    ev.add_argument("--device", default="cpu", help="where to run (cpu, cuda, cuda:1, ...)")
    ev.add_argument("--json", metavar="PATH", help="also write the metrics as JSON to PATH")
    ev.add_argument("--probes", metavar="JSONL", help="JSONL of your facts (prompt, answer): report recall")

    gen = sub.add_parser(
        "generate",
        help="continue a prompt with a checkpoint (KV cache; greedy, or sampled with temperature/top-k/top-p)",
        description="Encode PROMPT with the run's tokenizer (bos prepended), decode up to --max-new-tokens tokens "
        "and print the continuation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("checkpoint", help="a run directory, its checkpoint.pt, or an exported .safetensors file")
    gen.add_argument("prompt", help="text to continue (facts runs: words of the run's corpus only)")
    gen.add_argument("--max-new-tokens", type=_number(int, 0), default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=nonneg_float, default=0.0, help="0: greedy; else sample softmax(logits/T)")
    gen.add_argument("--top-k", type=pos_int, default=None, help="sample only from the k most likely tokens")
    gen.add_argument("--top-p", type=pos_float, default=None, help="nucleus sampling: the smallest set with mass >= p")
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampler (None: different samples every run)")
    gen.add_argument("--device", default="cpu", help="where to run (cpu, cuda, cuda:1, ...)")
    gen.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="stop at the end-of-document token")  # fmt: skip

    le = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks (lm-eval's own or yours) on a checkpoint (the 'lmeval' extra)",
        description="Evaluate a run directory, checkpoint or exported .safetensors file with lm-evaluation-harness "
        "(memlayers.integrations.lmeval.MemlayersLM: the run's model and tokenizer) and print lm-eval's table. "
        "Tasks are lm-eval task names; your own tasks are YAML files in --include-path (datasets from local files).",
    )
    le.add_argument("checkpoint", help="a run directory, its checkpoint.pt, or an exported .safetensors file")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    le.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    le.add_argument("--limit", type=pos_int, default=None, help="at most this many examples per task")
    le.add_argument("--batch-size", type=pos_int, default=16, help="rows per forward pass")
    le.add_argument("--device", default="cpu", help="where to run (cpu, cuda, cuda:1, ...)")
    le.add_argument("--json", metavar="PATH", help="also write the per-task metrics as JSON to PATH")

    exp = sub.add_parser(
        "export",
        help="write a checkpoint's model (one process's or a sharded one of many) to one safetensors file",
        description="Write the model of a run directory or checkpoint file to OUT (.safetensors): weights, usage "
        "statistics, and the run's config in the metadata. `memlayers eval/generate OUT` and train.init_from=OUT "
        "load it in one process; so does safetensors.torch.load_file.",
    )
    exp.add_argument("checkpoint", help="a run directory or its checkpoint.pt")
    exp.add_argument("out", help="the file to write (name ending in .safetensors)")
    exp.add_argument("--force", action="store_true", help="replace OUT if it exists")

    cmp = sub.add_parser(
        "compare",
        help="train dense, MoE and memory arms (or every memory kind: --preset cpu_family) at matched FLOPs "
        "and compare them",
        description="Train every arm of a preset on the same synthetic facts and budget (finished arms are reused, "
        "interrupted ones resume), then print one table and write results.{json,csv,md}, loss.png and "
        "recall_vs_flops.png to the output directory.",
    )
    cmp.add_argument("--preset", default="cpu", help="which comparison (see --list)")
    cmp.add_argument("--list", action="store_true", help="list the presets and exit")
    cmp.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/compare-PRESET)")
    cmp.add_argument("--arms", default=None, help="comma-separated subset of the arms, e.g. dense,memory_plus")
    cmp.add_argument("--seeds", type=pos_int, default=1, help="train every arm over this many seeds (init and "
                     "data order; the facts stay) and report mean ± std; the first seed's runs are the plain ones")  # fmt: skip
    cmp.add_argument("--tune-lr", action="store_true", help="first choose each arm's learning rate by a short "
                     "sweep (a quarter of the steps at each of --lr-factors times the preset's lr, extended past a "
                     "winning edge; the lowest validation loss wins); default --out runs/compare-PRESET-tuned")  # fmt: skip
    cmp.add_argument("--lr-factors", default="0.25,0.5,1,2", metavar="F,F,...",
                     help="the multiples of the preset's lr that --tune-lr tries (default 0.25,0.5,1,2)")  # fmt: skip
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp.add_argument("overrides", **overrides)

    ex = sub.add_parser(
        "experiment",
        help="run a packaged experiment: utilisation (sub-key collapse and its remedies) or continual (learning "
        "new facts without forgetting: full finetuning, LoRA, memory-only and sparse memory finetuning)",
        description="utilisation: train a baseline product-key memory, each sub-key remedy and all of them "
        "together over several seeds, on a skewed synthetic regression and on a byte-level language model of local "
        "text (this Python's standard library); write <out>/<task>/results.{json,md} and usage.png and print the "
        "tables with the default rule's verdict. continual: pretrain a Memory+ model on some synthetic people's "
        "facts, finetune it on new people's in four ways and compare new-fact recall, old-fact recall and held-out "
        "loss at matched learning; write <out>/results.{json,md} and learning_vs_forgetting.png. "
        "Finished runs are reused.",
    )
    ex.add_argument("name", choices=["utilisation", "continual"], help="which experiment")
    ex.add_argument("--preset", default="cpu", help="cpu (minutes per arm) or gpu (one H100/H200; utilisation only)")
    ex.add_argument("--tasks", default="skewed,text", help="utilisation: comma-separated: skewed, text")
    ex.add_argument("--arms", default=None, help="comma-separated subset of the arms (default: all)")
    ex.add_argument("--seeds", type=pos_int, default=3, help="seeds per arm (default 3)")
    ex.add_argument("--steps", type=pos_int, default=None,
                    help="utilisation: training steps of every run (default: the preset's)")  # fmt: skip
    ex.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/NAME-PRESET)")
    ex.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _train(args) -> int:
    from .train import load_config, train

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = train(cfg, args.out, progress=False if args.quiet else None, force=args.force)
    if os.environ.get("RANK", "0") != "0":  # under torchrun the first process reports
        return 0
    print(json.dumps({k: result[k] for k in ("steps", "tokens", "final_loss", "tokens_per_s", "wall_time")}, indent=2))
    print(f"final evaluation: {json.dumps(result['eval'], indent=2)}")
    return 0


def _eval(args) -> int:
    from .data import build_dataset
    from .evaluate import evaluate, load_probes, probe_recall
    from .train import load_checkpoint
    from .train.trainer import resolve_device

    _check_json_path(args.json)  # before the evaluation, not after it
    cfg, model, extra = load_checkpoint(args.checkpoint, device=resolve_device(args.device, "--device"))
    dataset = build_dataset(cfg.data)
    # the user's probes first: a bad file fails before the (longer) evaluation
    probes = probe_recall(model, load_probes(args.probes, dataset.tokenizer)) if args.probes else {}
    metrics = evaluate(model, dataset, limit=args.limit, batch_size=cfg.train.batch_size,
                       seq_len=cfg.train.seq_len)  # fmt: skip
    metrics.update(probes)
    print(f"{args.checkpoint}: step {extra['step']}, {extra['tokens']:,} tokens")
    width = max(map(len, metrics), default=0)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


def _lm_eval(args) -> int:
    from .integrations.lmeval import evaluate_tasks

    _check_json_path(args.json)
    if args.include_path and not os.path.isdir(args.include_path):
        raise ValueError(f"--include-path {args.include_path}: not a folder; give the folder of your task YAML files")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate_tasks(args.checkpoint, tasks, include_path=args.include_path, limit=args.limit,
                             device=args.device, batch_size=args.batch_size)  # fmt: skip
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results["results"], f, indent=2, default=str)
    return 0


def _export(args) -> int:
    from .train.export import export_safetensors

    out = export_safetensors(args.checkpoint, args.out, force=args.force)
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB)")
    return 0


def _check_json_path(path: str | None) -> None:
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder and not os.path.isdir(folder):
        raise ValueError(f"--json {path}: the folder {folder} does not exist; create it or choose another path")


def _compare(args) -> int:
    from .compare import PRESETS, get_preset, run_compare

    if args.list:
        width = max(map(len, PRESETS))
        for name in PRESETS:
            print(f"{name:<{width}}  {get_preset(name).description}")
        return 0
    preset = get_preset(args.preset)
    _warn_gpu_preset_on_cpu(preset.name)
    arms = None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    tune = None
    if args.tune_lr:
        try:
            tune = [float(f) for f in args.lr_factors.split(",") if f.strip()]
        except ValueError:
            raise ValueError(
                f"--lr-factors takes comma-separated numbers, e.g. 0.25,0.5,1,2; got {args.lr_factors!r}"
            ) from None
    out = args.out or f"runs/compare-{preset.name}" + ("-tuned" if tune else "")
    run_compare(
        preset, out, arms=arms, overrides=args.overrides, progress=not args.quiet, seeds=args.seeds, tune_lr=tune
    )
    return 0


def _warn_gpu_preset_on_cpu(preset: str) -> None:
    import torch

    if preset.startswith("gpu") and not torch.cuda.is_available():
        print(f"warning: preset {preset!r} is sized for a GPU and this machine has none: it runs on the CPU, "
              "many times slower (hours to days); the cpu presets are sized for a CPU", file=sys.stderr)  # fmt: skip


def _experiment(args) -> int:
    names = lambda text: [a.strip() for a in text.split(",") if a.strip()]  # noqa: E731
    _warn_gpu_preset_on_cpu(args.preset)
    out = args.out or f"runs/{args.name}-{args.preset}"
    arms = None if args.arms is None else names(args.arms)
    if args.name == "continual":
        from .experiments.continual import run_continual

        if args.steps is not None or args.tasks != "skewed,text":
            raise ValueError("experiment continual: --steps and --tasks are options of utilisation; continual's "
                             "settings come from its preset")  # fmt: skip
        run_continual(out, arms=arms, seeds=args.seeds, preset=args.preset, show=not args.quiet)
        return 0
    from .experiments.utilisation import run_utilisation

    run_utilisation(out, tasks=names(args.tasks), arms=arms, seeds=args.seeds, preset=args.preset,
                    show=not args.quiet, steps=args.steps)  # fmt: skip
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that KEY=VALUE overrides may also follow options (``train --quiet a.b=1``),
    which argparse's one positional list cannot take."""
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        getattr(args, "subparser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    try:
        return _run(args)
    except KeyboardInterrupt as e:  # training says where it stopped and how to resume
        message = str(e) or "interrupted"
        if not str(e) and args.command in ("train", "compare", "experiment"):
            message += "; rerun the same command to resume from the last checkpoint"
        print(f"memlayers {args.command}: {message}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`memlayers compare --list | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except ImportError as e:  # a module of an extra (tqdm, omegaconf, ...) is missing: one line naming the extra
        missing = missing_extra(e)
        if missing is None:
            raise
        print(f"memlayers {args.command}: error: {missing}", file=sys.stderr)
        return 2


def _run(args) -> int:
    commands = {
        "train": _train,
        "eval": _eval,
        "export": _export,
        "compare": _compare,
        "experiment": _experiment,
        "generate": generate_command,
        "lm-eval": _lm_eval,
    }
    if args.command in commands:
        try:
            return commands[args.command](args)
        except BrokenPipeError:
            raise
        except RunError as e:  # the run went wrong, not its input: diverged, failed arms
            print(f"memlayers {args.command}: error: {e}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as e:  # bad configs, checkpoints, presets, paths, full disks: one clear line
            ours = isinstance(e, OSError) and e.strerror and e.filename is None  # ours: no "[Errno N]" prefix
            print(f"memlayers {args.command}: error: {e.strerror if ours else e}", file=sys.stderr)
            return 2
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
        try:
            _check_json_path(args.json)
        except ValueError as e:
            args.subparser.error(str(e))
        results = run_demo(cfg, progress=not args.quiet)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
