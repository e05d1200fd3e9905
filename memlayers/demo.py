"""The memlayers demo: a memory layer learns thousands of random facts on a CPU in well under a minute.

The task (``make_recall_task``): ``facts`` random key vectors of width ``dim``, each mapped to a
random class among ``classes``. Training batches draw facts with Zipf-skewed frequencies (the
fact of rank r with probability proportional to r^-zipf), as facts occur in real text: the head
is seen thousands of times, the tail a handful. Inputs carry no pattern, so the only way to score
is to *store* every key -> class pair. Recall is measured on every fact once (uniform over facts)
and separately on the most frequent 10% (head) and on the rest (tail).

The model is ``classifier(MemoryLayer(x))``, trained with cross-entropy, ``build_optimizer``
(values at 10x the base learning rate, no decay on values and sub-keys) and ``clip_grad_norms``.
For comparison a dense GELU MLP with the same forward FLOPs per token is trained on the same
batches with the same classifier.

    from memlayers.demo import DemoConfig, run_demo
    results = run_demo(DemoConfig(facts=1024, steps=200), progress=False)
    results["memory"]["recall"]       # fraction of all facts recalled exactly
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._extras import require
from .accounting import memory_flops
from .memory import PRESETS, MemoryLayer, preset
from .memory.config import KeyedConfig, check_field_types
from .optim import VALUE_OPTIMIZERS, build_optimizer, clip_grad_norms, lr_decay_scale

HEAD_FRACTION = 0.1  # the Zipf "head": the most frequent 10% of the facts


@dataclass
class RecallTask:
    """Facts ``inputs[i] -> targets[i]``, drawn with probability ``probs[i]`` (fact 0 is the most frequent).

    inputs (F, dim) float32, targets (F,) int64 in [0, classes), probs (F,) float64 summing to 1.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor
    classes: int

    @property
    def num_facts(self) -> int:
        return self.inputs.shape[0]

    @property
    def head(self) -> torch.Tensor:
        """(F,) bool: True for the most frequent ``HEAD_FRACTION`` of the facts (at least one)."""
        head = torch.zeros(self.num_facts, dtype=torch.bool)
        head[: max(1, round(HEAD_FRACTION * self.num_facts))] = True
        return head

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size,) int64 fact ids drawn i.i.d. from ``probs``."""
        return torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)


def make_recall_task(
    facts: int = 4096, dim: int = 64, classes: int = 512, zipf: float = 1.0, offset: float = 1.0, seed: int = 0
) -> RecallTask:
    """A synthetic recall task, a deterministic function of its arguments.

    Inputs are ``offset * u + z`` with z ~ N(0, I/dim) per fact (norm ~1) and u one shared unit
    vector: the common offset points all queries the same way at first, so retrieval has to
    learn to spread them over the memory (the usage metrics show how well it does). Targets are
    uniform over ``classes``; ``zipf=0`` samples facts uniformly.
    """
    if facts < 1 or dim < 1 or classes < 2:
        raise ValueError(f"make_recall_task: need facts >= 1, dim >= 1, classes >= 2; got {facts}, {dim}, {classes}")
    if zipf < 0:
        raise ValueError(f"make_recall_task: zipf must be >= 0 (0 = uniform), got {zipf}")
    g = torch.Generator().manual_seed(seed)
    shared = F.normalize(torch.randn(dim, generator=g), dim=0)
    inputs = offset * shared + torch.randn(facts, dim, generator=g) / math.sqrt(dim)
    targets = torch.randint(classes, (facts,), generator=g)
    probs = torch.arange(1, facts + 1, dtype=torch.float64).pow(-zipf)
    return RecallTask(inputs, targets, probs / probs.sum(), classes)


def demo_presets() -> list[str]:
    """The presets the demo can run: memories addressed by product keys from x alone (not by token ids)."""
    return sorted(name for name, p in PRESETS.items() if issubclass(p.config, KeyedConfig))


@dataclass
class DemoConfig:
    """Everything the demo does. The defaults take ~20-40 s on 2 CPU cores and recall >99% of the facts.

    lr is the base learning rate (memory values get ``value_lr_ratio`` times it); the dense
    baseline gets its own ``baseline_lr``, the best of {3e-3, 1e-2, 3e-2, 6e-2, 1e-1} at these defaults.
    """

    facts: int = 4096
    classes: int = 512
    dim: int = 64
    zipf: float = 1.0
    offset: float = 1.0
    steps: int = 600
    batch_size: int = 512
    lr: float = 3e-3
    value_lr_ratio: float | None = None  # None: the value optimizer's default (memlayers.optim.VALUE_LR_RATIOS)
    preset: str = "memory"
    n_keys: int = 128
    heads: int = 4
    topk: int = 16
    value_optimizer: str = "adamw"
    baseline: bool = True
    baseline_lr: float = 3e-2
    eval_every: int = 50
    seed: int = 0
    threads: int | None = None  # None: every CPU this process may use

    def __post_init__(self):
        for f, problem in check_field_types(self):  # types first: the checks below compare
            raise ValueError(f"{f.name} {problem}")
        for name in ("facts", "steps", "batch_size", "n_keys", "heads", "topk", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim < 4:
            raise ValueError(f"dim must be >= 4 (a query splits into two halves of at least 1), got {self.dim}")
        if self.classes < 2:
            raise ValueError(f"classes must be >= 2, got {self.classes}")
        if self.topk > self.n_keys:
            raise ValueError(f"topk must be <= n_keys (the top-k of n_keys sub-keys), got {self.topk} > {self.n_keys}")
        for name in ("lr", "value_lr_ratio", "baseline_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.zipf >= 0:
            raise ValueError(f"zipf must be >= 0 (0 = uniform), got {self.zipf}")
        if self.preset not in demo_presets():
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {demo_presets()}")
        if self.value_optimizer not in VALUE_OPTIMIZERS:
            raise ValueError(f"value_optimizer must be one of {VALUE_OPTIMIZERS}, got {self.value_optimizer!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


class Classifier(nn.Module):
    """``head(body(x))``: x (B, dim) -> logits (B, classes)."""

    def __init__(self, body: nn.Module, dim: int, classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def dense_mlp(dim: int, flops: int) -> nn.Sequential:
    """A GELU MLP dim -> hidden -> dim whose 4*dim*hidden forward FLOPs per token match ``flops``."""
    hidden = max(1, round(flops / (4 * dim)))
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


@torch.no_grad()
def recall(model: nn.Module, task: RecallTask, batch_size: int = 4096) -> torch.Tensor:
    """(F,) bool: is each fact's class the model's top-1 prediction (eval mode, every fact once)."""
    was_training = model.training
    model.eval()
    hits = [
        model(task.inputs[i : i + batch_size]).argmax(-1) == task.targets[i : i + batch_size]
        for i in range(0, task.num_facts, batch_size)
    ]
    model.train(was_training)
    return torch.cat(hits)


def train(model: nn.Module, task: RecallTask, cfg: DemoConfig, lr: float, desc: str, progress: bool = True) -> dict:
    """Fit ``model`` to ``task`` for ``cfg.steps`` Zipf-sampled batches; return its final metrics.

    Every model sees the same batches (a generator seeded from ``cfg.seed``). The bar shows the
    running training loss and the recall over all facts, refreshed every ``cfg.eval_every`` steps.
    """
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = build_optimizer(model, lr, value_lr_ratio=cfg.value_lr_ratio, value_optimizer=cfg.value_optimizer)
    seen = torch.zeros(task.num_facts, dtype=torch.bool)
    loss_ema = None
    start = time.perf_counter()
    tqdm = require("tqdm", "train").tqdm  # imported here: `import memlayers.cli` needs only torch
    bar = tqdm(range(cfg.steps), desc=f"{desc:>9}", disable=not progress, mininterval=0.5, dynamic_ncols=True)
    base_lrs = [group["lr"] for group in opt.param_groups]
    for step in bar:
        for group, base in zip(opt.param_groups, base_lrs):  # constant, but for a decaying value lr (UltraMem)
            group["lr"] = base * lr_decay_scale(group.get("lr_decay"), step + 1, cfg.steps)
        ids = task.sample(cfg.batch_size, g)  # (B,)
        seen[ids] = True
        logits = model(task.inputs[ids])  # (B, classes)
        loss = F.cross_entropy(logits, task.targets[ids])
        aux = [m.aux_loss() for m in model.modules() if isinstance(m, MemoryLayer)]
        loss = loss + sum(a for a in aux if a is not None)  # e.g. UltraMem's core penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norms(model, max_norm=1.0, value_max_norm=1.0)
        opt.step()
        for layer in (m for m in model.modules() if isinstance(m, MemoryLayer)):
            layer.after_step(opt)  # e.g. dead sub-key restarts
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if progress and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            bar.set_postfix(loss=f"{loss_ema:.3f}", recall=f"{recall(model, task).float().mean().item():.3f}")
    seconds = time.perf_counter() - start
    hits = recall(model, task).float()
    head = task.head
    return dict(
        loss=loss_ema,
        recall=hits.mean().item(),
        recall_head=hits[head].mean().item(),
        recall_tail=hits[~head].mean().item() if (~head).any() else float("nan"),
        seen=seen.float().mean().item(),
        params=sum(p.numel() for p in model.parameters()),
        seconds=seconds,
    )


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_demo(cfg: DemoConfig | None = None, progress: bool = True, report: bool = True) -> dict:
    """Train the memory model, and the dense baseline if ``cfg.baseline``; return (and print) the results.

    Seeds torch with ``cfg.seed`` and runs on ``cfg.threads`` threads (default: every available
    CPU; torch's previous thread count is restored afterwards). ``progress`` shows tqdm bars,
    ``report`` prints ``format_results`` at the end. Returns ``{"config", "memory", "usage",
    "baseline" (if run), "threads", "seconds"}``: "memory" and "baseline" as ``train`` returns
    plus ``flops_per_token``; "usage" is the memory layer's ``usage.summary()`` after training.
    """
    cfg = cfg or DemoConfig()
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or _available_cpus())
    try:
        results = {"config": asdict(cfg), "threads": torch.get_num_threads()}
        torch.manual_seed(cfg.seed)
        task = make_recall_task(cfg.facts, cfg.dim, cfg.classes, cfg.zipf, cfg.offset, cfg.seed)
        mem_cfg = preset(
            cfg.preset, cfg.dim, n_keys=cfg.n_keys, heads=cfg.heads, topk=cfg.topk,
            sparse_values=cfg.value_optimizer != "adamw",
        )  # fmt: skip
        layer = MemoryLayer(mem_cfg)
        results["memory"] = train(Classifier(layer, cfg.dim, cfg.classes), task, cfg, cfg.lr, "memory", progress)
        results["memory"].update(
            flops_per_token=memory_flops(layer), slots=mem_cfg.num_values, usage_window=mem_cfg.usage_window
        )
        results["usage"] = layer.usage.summary()
        if cfg.baseline:
            mlp = dense_mlp(cfg.dim, memory_flops(layer))
            model = Classifier(mlp, cfg.dim, cfg.classes)
            results["baseline"] = train(model, task, cfg, cfg.baseline_lr, "dense MLP", progress)
            results["baseline"].update(flops_per_token=4 * cfg.dim * mlp[0].out_features, hidden=mlp[0].out_features)
    finally:
        torch.set_num_threads(previous_threads)
    results["seconds"] = time.perf_counter() - start
    if report:
        print(format_results(results))
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_results(results: dict) -> str:
    """The results of ``run_demo`` as a small plain-text table."""
    cfg, mem, u = results["config"], results["memory"], results["usage"]
    base = results.get("baseline")
    n, slots = cfg["n_keys"], mem["slots"]
    models = [mem] + ([base] if base else [])

    def line(label: str, text: str) -> str:
        return f"  {label:<26}{text}"

    def row(label: str, key: str, fmt=_pct) -> str:
        return line(label, "".join(f"{fmt(m[key]):>14}" for m in models))

    lines = [
        "",
        f"{cfg['facts']} facts -> {cfg['classes']} classes, dim {cfg['dim']}, Zipf {cfg['zipf']}; "
        + f"{cfg['steps']} steps x {cfg['batch_size']} facts, seed {cfg['seed']}",
        f"memory: preset {cfg['preset']!r}, N = {n}^2 = {slots:,} slots, {cfg['heads']} heads x top-{cfg['topk']}, "
        + f"values via {cfg['value_optimizer']}",
    ]
    if base:
        lines.append(f"dense MLP: {cfg['dim']} -> {base['hidden']} -> {cfg['dim']} (GELU), same forward FLOPs/token")
    lines += [
        "",
        line("", "".join(f"{name:>14}" for name in ("memory", "dense MLP")[: len(models)])),
        row("recall, all facts", "recall"),
        row(f"recall, head (top {HEAD_FRACTION:.0%})", "recall_head"),
        row(f"recall, tail (other {1 - HEAD_FRACTION:.0%})", "recall_tail"),
        row("facts seen in training", "seen"),
        row("final loss (EMA)", "loss", lambda x: f"{x:.4f}"),
        row("parameters", "params", lambda x: f"{x:,}"),
        row("forward FLOPs/token", "flops_per_token", lambda x: f"{x:,}"),
        row("train time", "seconds", lambda x: f"{x:.1f} s"),
        "",
        f"  memory usage (EMAs and coverage over the last {min(mem['usage_window'], cfg['steps'])} steps):",
        line(
            "coverage",
            f"{_pct(u['coverage'])} of slots (uniform ideal {_pct(u['coverage_ideal'])}, "
            + f"ratio {u['coverage_ratio']:.3f})",
        ),
        line(
            "KL to uniform",
            f"{u['kl_unweighted']:.3f} nats (effective usage {_pct(u['usage_unweighted'])}); "
            + f"weighted {u['kl_weighted']:.3f} ({_pct(u['usage_weighted'])})",
        ),
        line("Gini", f"{u['gini_unweighted']:.3f} (weighted {u['gini_weighted']:.3f})"),
        line("slots holding 50/90/99%", f"{u['top50']:,.0f} / {u['top90']:,.0f} / {u['top99']:,.0f} of {slots:,}"),
        line(
            "sub-key KL, 1st/2nd half",
            f"{u['subkey_kl_first']:.3f} / {u['subkey_kl_second']:.3f} nats (max log {n} = {math.log(n):.2f})",
        ),
        line("dead sub-keys", _pct(u["dead_subkeys"])),
        "",
        f"  total wall time {results['seconds']:.1f} s ({results['threads']} threads)",
    ]
    return "\n".join(lines)
