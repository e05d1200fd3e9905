"""CPU benchmarks: one memory layer (time and peak memory), and training steps of the comparison's arms.

    python benchmarks/layer_cpu.py            # or ./dev bench; the layer table (~3-4 min on 2 cores)
    python benchmarks/layer_cpu.py --n-keys 256 --repeats 3
    python benchmarks/layer_cpu.py --steps    # a training step of each arm of `memlayers compare` (~1-2 min)
    python benchmarks/layer_cpu.py --steps --arms dense,memory_plus --repeats 20 --profile memory_plus

Layer table. Setting: dim 256, 2048 tokens, 4 heads x top-32 (128 value rows per token), N = n_keys^2 slots.
Rows, for each N:
  * SwiGLU FFN of the same dim (hidden 8/3*dim rounded to a multiple of 64), what the memory sits beside;
  * the bag alone on uniform random indices (T, 128) and softmax weights, fwd+bwd w.r.t. values
    and weights: the naive ``values[idx]`` gather (``memlayers.ops.embedding_bag_naive`` under
    autograd) against ``memlayers.embedding_bag`` with dense and with row-sparse value gradients;
  * the whole ``MemoryLayer`` (preset "memory") with dense value gradients + AdamW, and with
    ``sparse_values=True`` + ``value_optimizer="sparse_adam"`` (lazy Adam on the touched rows).

Time: median over ``--repeats`` iterations after one warm-up iteration, gradients set to None
(untimed) before each; the step column times ``optimizer.step()`` alone.

Peak memory: every configuration runs in fresh subprocesses (this script with ``--worker``), one
for time and one for memory. The memory worker first tells glibc's malloc to serve blocks >= 64 KiB
with mmap and to trim freed memory (``mallopt``), so RSS follows the live allocations; after setup
and a warm-up iteration, with gradients freed, it reads the current RSS from /proc/self/statm,
resets the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``), runs one
fwd+bwd(+step) and reads the peak with ``getrusage(RUSAGE_SELF).ru_maxrss``. The difference is
the peak *extra* memory of one iteration (activations, gradients, temporaries); parameters and
optimizer state exist before it and are not counted. Linux only.

Training steps (``--steps``): the arms of a compare preset (``--preset``, default "cpu") built as
``memlayers compare`` builds them (the preset's data, models and optimizers, its batch size and sequence
length), and one step taken as the trainer takes it: forward, backward, gradient clipping, optimizer step,
``zero_grad(set_to_none=True)``. The arms take turns (each repeat times one step of every arm, so a shared
machine's load falls on them alike), after 3 warm-up steps each; the table gives the minimum and the
median over ``--repeats``, and two ratios to the dense arm: of the minimums, and the median over repeats
of the ratio within a repeat (steadier when the load changes). ``--profile ARM`` adds torch.profiler's
table of that arm's ops over 5 more steps (self CPU time, summed over the 5).
"""

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import memlayers
from memlayers.accounting import memory_flops
from memlayers.ops import embedding_bag, embedding_bag_naive

DIM, TOKENS, HEADS, TOPK = 256, 2048, 4, 32
CONFIGS = {  # name -> (label, per N?)
    "ffn": ("SwiGLU FFN, hidden {hidden}", False),
    "naive": ("bag: naive `values[idx]` gather (autograd)", True),
    "bag_dense": ("bag: `memlayers.embedding_bag`, dense grad", True),
    "bag_sparse": ("bag: `memlayers.embedding_bag`, sparse grad", True),
    "layer_dense": ("MemoryLayer, dense values + fused AdamW", True),
    "layer_sparse": ("MemoryLayer, sparse values + SparseRowAdam", True),
}


class SwiGLU(nn.Module):
    """x (T, dim) -> W2 (silu(W1 x) * W3 x), (T, dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def swiglu_hidden(dim: int) -> int:
    return 64 * round(8 * dim / 3 / 64)


def build(name: str, n_keys: int):
    """Set up one configuration.

    Returns fwd_bwd () -> None, step (() -> None) or None, leaves (tensors whose .grad to free),
    rows touched by the batch (or None), forward FLOPs per token.
    """
    torch.manual_seed(0)
    grad_out = torch.randn(TOKENS, DIM)  # (T, dim) upstream gradient
    x = torch.randn(TOKENS, DIM, requires_grad=True)  # (T, dim)
    if name == "ffn":
        hidden = swiglu_hidden(DIM)
        ffn = SwiGLU(DIM, hidden)
        opt = torch.optim.AdamW(ffn.parameters(), lr=1e-3, fused=True)
        return lambda: ffn(x).backward(grad_out), opt.step, [x, *ffn.parameters()], None, 6 * DIM * hidden
    if name.startswith("layer"):
        sparse = name == "layer_sparse"
        layer = memlayers.MemoryLayer.from_preset(
            "memory", DIM, n_keys=n_keys, heads=HEADS, topk=TOPK, sparse_values=sparse
        )
        opt = memlayers.build_optimizer(layer, 1e-3, value_optimizer="sparse_adam" if sparse else "adamw")
        touched = layer.retrieve(x)[0].unique().numel()
        return lambda: layer(x).backward(grad_out), opt.step, [x, *layer.parameters()], touched, memory_flops(layer)
    N, L = n_keys**2, HEADS * TOPK
    values = (torch.randn(N, DIM) * DIM**-0.5).requires_grad_()  # (N, dim)
    indices = torch.randint(N, (TOKENS, L))  # (T, L)
    weights = torch.randn(TOKENS, L).softmax(-1).requires_grad_()  # (T, L)
    if name == "naive":
        bag = lambda: embedding_bag_naive(values, indices, weights)
    else:
        bag = lambda: embedding_bag(values, indices, weights, sparse_grad=name == "bag_sparse")
    return lambda: bag().backward(grad_out), None, [values, weights], indices.unique().numel(), 2 * L * DIM


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def unmap_on_free() -> None:
    """Make glibc mmap blocks >= 64 KiB and trim on free (M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)
    libc.mallopt(-1, 0)


def worker(name: str, n_keys: int, measure: str, repeats: int, threads: int) -> dict:
    """Run one configuration in this process: its median timings (ms), or its peak extra memory (MiB)."""
    torch.set_num_threads(threads)
    if measure == "memory":
        unmap_on_free()  # before anything is allocated, or freed heap chunks distort RSS
    fwd_bwd, step, leaves, touched, flops = build(name, n_keys)

    def iteration():
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        fwd_bwd()
        t1 = time.perf_counter()
        if step is not None:
            step()
        return t1 - t0, time.perf_counter() - t1

    iteration()  # warm-up: lazy initialisation, optimizer state
    if measure == "time":
        times = [iteration() for _ in range(repeats)]
        return dict(
            fwd_bwd_ms=1e3 * statistics.median(t for t, _ in times),
            step_ms=1e3 * statistics.median(s for _, s in times) if step is not None else None,
            touched=touched,
            flops=flops,
        )
    for t in leaves:
        t.grad = None
    before = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark that ru_maxrss reports
    iteration()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return dict(peak_extra_mib=(peak - before) / 2**20)


def run_worker(name: str, n_keys: int, measure: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--measure", measure, "--n-keys", str(n_keys),
           "--repeats", str(repeats), "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def train_step_fn(cfg, dataset):
    """One arm (a ``RunConfig``) as the trainer builds it -> (step(i): one training step on batch i, parameters)."""
    from memlayers.model import Transformer  # here: only --steps needs the training extras
    from memlayers.optim import VALUE_LR_RATIOS, build_optimizer, clip_grad_norms

    t = cfg.train
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = dataset.vocab_size
    torch.manual_seed(t.seed)
    model = Transformer(cfg.model).train()
    optimizer = build_optimizer(
        model,
        lr=t.lr,
        weight_decay=t.weight_decay,
        betas=(t.beta1, t.beta2),
        value_lr_ratio=VALUE_LR_RATIOS[t.value_optimizer] if t.value_lr_ratio is None else t.value_lr_ratio,
        value_optimizer=t.value_optimizer,
    )

    def step(i: int) -> None:
        x, y = dataset.train_batch(i, t.batch_size * t.grad_accum, t.seq_len)  # (A*B, T) each
        for xs, ys in zip(x.split(t.batch_size), y.split(t.batch_size)):
            out = model(xs, ys)
            (out.loss.float() / t.grad_accum + out.aux_loss.float() / t.grad_accum).backward()
        clip_grad_norms(model, t.clip, t.value_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def train_steps(preset: str, arms: list[str] | None, repeats: int, profile_arm: str | None) -> None:
    """Print the table of training-step times of a compare preset's arms (see the module docstring)."""
    from memlayers.compare.presets import get_preset
    from memlayers.compare.runner import arm_configs
    from memlayers.data import build_dataset

    configs = arm_configs(get_preset(preset), arms=arms)
    if profile_arm is not None and profile_arm not in configs:
        raise ValueError(f"--profile {profile_arm!r} is not among the arms timed: {list(configs)}")
    dataset = build_dataset(next(iter(configs.values())).data)  # one preset: the same data for every arm
    steps, params = {}, {}
    for arm, cfg in configs.items():
        steps[arm], params[arm] = train_step_fn(cfg, dataset)
        for i in range(3):  # warm-up: lazy initialisation, optimizer state
            steps[arm](i)
    times = {arm: [] for arm in configs}
    for r in range(repeats):
        for arm, step in steps.items():
            start = time.perf_counter()
            step(3 + r)
            times[arm].append(time.perf_counter() - start)
    t = next(iter(configs.values())).train
    print(
        f"# preset {preset!r}: one training step = {t.batch_size * t.grad_accum} x {t.seq_len} tokens; "
        f"{torch.get_num_threads()} torch threads; min and median of {repeats} steps after 3 warm-up steps"
    )
    print()
    print("| arm | params | step ms (min) | step ms (median) | x dense (min / min) | x dense (median of pairs) |")
    print("|---|---:|---:|---:|---:|---:|")
    dense = times.get("dense")
    for arm, ts in times.items():
        ratios = "– | –"
        if dense:
            ratios = f"{min(ts) / min(dense):.2f} | {statistics.median(a / b for a, b in zip(ts, dense)):.2f}"
        print(f"| {arm} | {params[arm]:,} | {1e3 * min(ts):.1f} | {1e3 * statistics.median(ts):.1f} | {ratios} |")
    if profile_arm is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(5):
                steps[profile_arm](3 + repeats + i)
        print(f"\n# {profile_arm}: torch.profiler over 5 steps, by self CPU time\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-keys", type=int, nargs="+", default=[256, 512], help="sub-keys per half (N = n^2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per configuration (median)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--steps", action="store_true", help="time training steps of a compare preset's arms")
    parser.add_argument("--preset", default="cpu", help="with --steps: the compare preset")
    parser.add_argument("--arms", help="with --steps: comma-separated arms (default: all of the preset's)")
    parser.add_argument("--profile", metavar="ARM", help="with --steps: also profile this arm's steps")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n_keys[0], args.measure, args.repeats, args.threads)))
        return
    if args.steps:
        torch.set_num_threads(args.threads)
        print(f"# {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}, memlayers {memlayers.__version__}")
        train_steps(args.preset, args.arms.split(",") if args.arms else None, args.repeats, args.profile)
        return

    start = time.perf_counter()
    print(f"# memlayers CPU layer benchmark: dim {DIM}, {TOKENS} tokens, {HEADS} heads x top-{TOPK} "
          f"({HEADS * TOPK} value rows per token), fp32")  # fmt: skip
    print(f"# {os.cpu_count()} CPUs ({cpu_model()}), {args.threads} torch threads, torch {torch.__version__}, "
          f"memlayers {memlayers.__version__}")  # fmt: skip
    print(f"# time: median of {args.repeats} iterations after 1 warm-up; step = optimizer.step() alone")
    print("# peak extra: max RSS during one fwd+bwd(+step) after warm-up minus RSS before it, in a fresh process per")
    print("#   config (RSS from /proc/self/statm; high-water mark reset via /proc/self/clear_refs, read as getrusage")
    print("#   ru_maxrss; glibc set to mmap >= 64 KiB and trim on free; parameters and optimizer state not counted)")
    print()
    print("| N | table MiB | configuration | fwd MFLOP/token | rows touched | fwd+bwd ms | step ms | peak extra MiB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    rows = [("ffn", args.n_keys[0])] + [(name, n) for n in args.n_keys for name, (_, per_n) in CONFIGS.items() if per_n]
    for name, n in rows:
        r = run_worker(name, n, "time", args.repeats, args.threads) | run_worker(name, n, "memory", 0, args.threads)
        per_n = CONFIGS[name][1]
        N = f"{n * n:,}" if per_n else "–"
        table = f"{n * n * DIM * 4 / 2**20:,.0f}" if per_n else "–"
        label = CONFIGS[name][0].format(hidden=swiglu_hidden(DIM))
        touched = f"{r['touched']:,}" if r["touched"] is not None else "–"
        step = f"{r['step_ms']:.1f}" if r["step_ms"] is not None else "–"
        print(f"| {N} | {table} | {label} | {r['flops'] / 1e6:.2f} | {touched} | {r['fwd_bwd_ms']:.1f} | {step} "
              f"| {r['peak_extra_mib']:,.0f} |", flush=True)  # fmt: skip
    print(f"\n# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
