"""The memlayers demo: a memory layer learns thousands of random facts on a CPU in about a minute.

The task (``make_recall_task``): ``facts`` random key vectors of width ``dim``, each mapped to a
random class among ``classes``. Training batches sample facts with Zipf-skewed frequencies
(rank r drawn with probability proportional to r^-zipf), as facts are in real text, so a few
facts are seen thousands of times and the tail only a handful. Every fact's input is fixed, so
the only way to score well is to *store* the key -> class map: recall is measured on every fact
once (uniform over facts), and separately on the most frequent 10% (head) and the rest (tail).

The model is ``classifier(MemoryLayer(x))``, trained with cross-entropy, ``build_optimizer``
(values at 10x the base learning rate, no decay on values and sub-keys) and ``clip_grad_norms``.
For comparison, a dense MLP of about the same FLOPs per token gets the same steps and classifier.

    from memlayers.demo import DemoConfig, run_demo
    results = run_demo(DemoConfig(facts=1024, steps=200))
    results["memory"]["recall"]   # fraction of facts recalled exactly
"""

import math
import os
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import PRESETS, preset
from .layers import MemoryLayer
from .optim import VALUE_OPTIMIZERS, build_optimizer, clip_grad_norms

HEAD_FRACTION = 0.1  # the "head" of the Zipf distribution: the most frequent 10% of facts


@dataclass
class RecallTask:
    """Facts ``inputs[i] -> targets[i]``, drawn with probability ``probs[i]`` (fact 0 most frequent).

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
        """(F,) bool: the most frequent ``HEAD_FRACTION`` of the facts."""
        head = torch.zeros(self.num_facts, dtype=torch.bool)
        head[: max(1, round(HEAD_FRACTION * self.num_facts))] = True
        return head

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size,) int64 fact ids, drawn i.i.d. from ``probs``."""
        return torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)


def make_recall_task(
    facts: int = 4096, dim: int = 64, classes: int = 512, zipf: float = 1.0, offset: float = 1.0, seed: int = 0
) -> RecallTask:
    """A deterministic synthetic recall task (same seed, same task).

    Inputs are ``offset * u + z`` with z ~ N(0, I/dim) per fact (norm ~1) and u one shared random
    unit vector: the common offset makes all queries point the same way at first, so retrieval
    has to learn to spread them over the memory. Targets are uniform over ``classes``.
    """
    if facts < 1 or dim < 1 or classes < 2:
        raise ValueError(f"make_recall_task: need facts >= 1, dim >= 1, classes >= 2; got {facts}, {dim}, {classes}")
    if zipf < 0:
        raise ValueError(f"make_recall_task: zipf must be >= 0 (0 = uniform), got {zipf}")
    g = torch.Generator().manual_seed(seed)
    shared = F.normalize(torch.randn(dim, generator=g), dim=0)
    inputs = offset * shared + torch.randn(facts, dim, generator=g) / math.sqrt(dim)
    targets = torch.randint(classes, (facts,), generator=g)
    ranks = torch.arange(1, facts + 1, dtype=torch.float64)
    probs = ranks.pow(-zipf)
    return RecallTask(inputs, targets, probs / probs.sum(), classes)


@dataclass
class DemoConfig:
    """Everything the demo does; the defaults run in about a minute on 2 CPU cores."""

    facts: int = 4096
    classes: int = 512
    dim: int = 64
    zipf: float = 1.0
    offset: float = 1.0
    steps: int = 600
    batch_size: int = 512
    lr: float = 3e-3
    value_lr_ratio: float = 10.0
    preset: str = "memory"
    n_keys: int = 128
    heads: int = 4
    topk: int = 16
    value_optimizer: str = "adamw"
    baseline: bool = True
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        for name in ("facts", "dim", "steps", "batch_size", "n_keys", "heads", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.classes < 2:
            raise ValueError(f"classes must be >= 2, got {self.classes}")
        if self.topk > self.n_keys:
            raise ValueError(f"topk must be <= n_keys, got topk={self.topk} > n_keys={self.n_keys}")
        if self.dim < 4:
            raise ValueError(f"dim must be >= 4 (the query is split into halves per head), got {self.dim}")
        if not self.lr > 0 or not self.value_lr_ratio > 0:
            raise ValueError(f"lr and value_lr_ratio must be > 0, got {self.lr} and {self.value_lr_ratio}")
        if self.zipf < 0:
            raise ValueError(f"zipf must be >= 0 (0 = uniform), got {self.zipf}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
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


def memory_flops(layer: MemoryLayer) -> int:
    """Forward FLOPs per token of a memory layer (value rows read, not the whole table)."""
    c = layer.config
    flops = 2 * c.dim * c.heads * c.key_dim  # query projection
    flops += 2 * c.heads * c.n_keys * c.key_dim  # both halves' sub-key scores
    flops += c.heads * c.topk * c.topk  # the k x k candidate grid
    flops += 2 * c.heads * c.topk * c.value_dim  # the weighted bag
    if c.gated:
        flops += 2 * c.dim * c.value_dim
    if layer.out_proj is not None:
        flops += 2 * c.value_dim * c.dim
    return flops


def dense_mlp(dim: int, flops: int) -> nn.Sequential:
    """A GELU MLP dim -> hidden -> dim whose 4*dim*hidden FLOPs per token match ``flops``."""
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


def train(model: nn.Module, task: RecallTask, cfg: DemoConfig, desc: str, quiet: bool = False) -> dict:
    """Fit ``model`` to ``task`` for ``cfg.steps`` Zipf-sampled batches; return its final metrics."""
    g = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every model
    opt = build_optimizer(model, cfg.lr, value_lr_ratio=cfg.value_lr_ratio, value_optimizer=cfg.value_optimizer)
    seen = torch.zeros(task.num_facts, dtype=torch.bool)
    loss_ema = acc_ema = None
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=quiet, dynamic_ncols=True, leave=True)
    for step in bar:
        ids = task.sample(cfg.batch_size, g)  # (B,)
        seen[ids] = True
        logits = model(task.inputs[ids])  # (B, classes)
        loss = F.cross_entropy(logits, task.targets[ids])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norms(model, max_norm=1.0, value_max_norm=1.0)
        opt.step()
        acc = (logits.argmax(-1) == task.targets[ids]).float().mean().item()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        acc_ema = acc if acc_ema is None else 0.9 * acc_ema + 0.1 * acc
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss_ema:.3f}", batch_recall=f"{acc_ema:.3f}")
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


def run_demo(cfg: DemoConfig | None = None, quiet: bool = False) -> dict:
    """Train the memory model (and the dense baseline if ``cfg.baseline``); print and return results.

    Returns ``{"config": dict, "memory": metrics, "usage": layer.usage.summary(), "baseline": metrics}``
    (no "baseline" when it is off), metrics as in ``train``.
    """
    cfg = cfg or DemoConfig()
    torch.set_num_threads(cfg.threads or max(torch.get_num_threads(), len(os.sched_getaffinity(0))))
    torch.manual_seed(cfg.seed)
    task = make_recall_task(cfg.facts, cfg.dim, cfg.classes, cfg.zipf, cfg.offset, cfg.seed)

    mem_cfg = preset(
        cfg.preset, cfg.dim, n_keys=cfg.n_keys, heads=cfg.heads, topk=cfg.topk,
        sparse_values=cfg.value_optimizer == "sparse_adam",
    )
    layer = MemoryLayer(mem_cfg)
    results = {"config": {f.name: getattr(cfg, f.name) for f in fields(cfg)}}
    results["memory"] = train(Classifier(layer, cfg.dim, cfg.classes), task, cfg, "memory", quiet)
    results["usage"] = layer.usage.summary()
    results["memory"]["flops_per_token"] = memory_flops(layer)
    if cfg.baseline:
        torch.manual_seed(cfg.seed)
        mlp = dense_mlp(cfg.dim, memory_flops(layer))
        results["baseline"] = train(Classifier(mlp, cfg.dim, cfg.classes), task, cfg, "dense MLP", quiet)
        results["baseline"]["flops_per_token"] = 4 * cfg.dim * mlp[0].out_features
    if not quiet:
        print(format_results(results, mem_cfg))
    return results


def format_results(results: dict, mem_cfg) -> str:
    cfg = results["config"]
    return repr(results)
