"""A regression task on skewed inputs that makes product-key addressing collapse (``reference/sparse_update.md``,
"CPU-A"): a memory layer must map each of F facts to its own random target.

Fact f's input is ``x_f = m0 + A u_f`` (+ fresh noise of std ``noise`` at every draw) in R^dim, with a large
mean ``m0`` shared by every fact and an anisotropic ``A = diag(1, 1/2, ..., 1/dim)``: raw queries point the
same way, so dot-product top-k keeps picking the same sub-keys. Facts are drawn with Zipf(1) frequencies;
targets are ``N(0, I)`` in R^out. The model is ``Linear(MemoryLayer(x))`` trained on the mean squared error.
"""

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..memory import MemoryLayer, preset
from ..metrics import UsageTracker
from ..optim import build_optimizer


@dataclass
class SkewedTask:
    """facts F, input width dim, target width out, mean_norm ||m0||, noise std; steps, batch, lr; the memory
    (``preset`` with ``layer`` options: n_keys, heads, topk, key_dim, ...); log_every: training curve points."""

    facts: int = 4096
    dim: int = 64
    out: int = 32
    mean_norm: float = 8.0
    noise: float = 0.02
    steps: int = 2000
    batch: int = 1024
    lr: float = 3e-3
    preset: str = "memory"
    layer: dict = field(default_factory=lambda: dict(n_keys=128, heads=2, topk=8, key_dim=32))
    log_every: int = 100


def make_facts(task: SkewedTask) -> dict:
    """The task's fixed data (the same for every arm and seed): clean inputs (F, dim), targets (F, out), Zipf
    probabilities (F,) with fact 0 the most frequent."""
    g = torch.Generator().manual_seed(1_000)
    mean = torch.randn(task.dim, generator=g)
    mean = mean * task.mean_norm / mean.norm()
    scale = 1.0 / torch.arange(1, task.dim + 1)
    inputs = mean + torch.randn(task.facts, task.dim, generator=g) * scale
    targets = torch.randn(task.facts, task.out, generator=g)
    probs = 1.0 / torch.arange(1, task.facts + 1)
    return {"inputs": inputs, "targets": targets, "probs": probs / probs.sum()}


class SkewedModel(nn.Module):
    """``Linear(MemoryLayer(x))``: x (B, dim) -> (B, out)."""

    def __init__(self, task: SkewedTask, options: dict):
        super().__init__()
        self.memory = MemoryLayer(preset(task.preset, task.dim, **{**task.layer, **options}))
        self.head = nn.Linear(task.dim, task.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.memory(x))


@torch.no_grad()
def evaluate(model: SkewedModel, task: SkewedTask, facts: dict, seed: int) -> dict:
    """Every fact once (uniformly; one noisy draw each): mean squared error over all facts and over the rare
    half (``tail_mse``), and the slot usage of that pass (``UsageTracker`` metrics) with the mean effective
    number of slots per token and head, ``effective_k`` = mean exp(entropy of the k weights)."""
    model.eval()
    device = facts["inputs"].device
    g = torch.Generator().manual_seed(2_000 + seed)
    x = facts["inputs"] + task.noise * torch.randn(facts["inputs"].shape, generator=g).to(device)
    err = torch.cat([(model(part) - t).square().mean(-1) for part, t in
                     zip(x.split(task.batch), facts["targets"].split(task.batch))])  # fmt: skip
    ids, weights = zip(*(model.memory.retrieve(part) for part in x.split(task.batch)))
    ids, weights = torch.cat(ids), torch.cat(weights)
    layer = model.memory.addressing
    tracker = UsageTracker(layer.grid, layer.heads, window=1, num_slots=layer.num_slots).to(device)
    tracker.update(ids, weights)
    usage = tracker.summary()
    w = weights.abs() / weights.abs().sum(-1, keepdim=True).clamp_min(1e-30)
    effective_k = torch.special.entr(w).sum(-1).exp().mean()
    model.train()
    return {
        "mse": float(err.mean()),
        "tail_mse": float(err[task.facts // 2 :].mean()),
        **{k: usage[k] for k in USAGE_KEYS},
        "effective_k": float(effective_k),
    }


def train_arm(task: SkewedTask, options: dict, seed: int, progress=None, device: str = "auto") -> dict:
    """Train one arm (layer ``options``) from seed ``seed`` on ``device`` ("auto": CUDA if available); returns
    {"final": evaluate(...), "curve": [...], "step_ms": mean wall time of a training step, "restarts": sub-keys
    restarted}. The curve has one point every ``log_every`` steps: step, mean training loss since the last point,
    and the layer's training usage (EMA over the last ~100 steps: ``CURVE_KEYS``)."""
    device = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    facts = {k: v.to(device) for k, v in make_facts(task).items()}
    torch.manual_seed(seed)
    model = SkewedModel(task, options).to(device)
    optimizer = build_optimizer(model, task.lr)
    g = torch.Generator().manual_seed(3_000 + seed)
    curve, step_time = [], 0.0
    loss_sum = torch.zeros((), device=device)
    for step in range(1, task.steps + 1):
        which = torch.multinomial(facts["probs"].cpu(), task.batch, replacement=True, generator=g).to(device)
        x = facts["inputs"][which] + task.noise * torch.randn(task.batch, task.dim, generator=g).to(device)
        _sync(device)
        tic = time.perf_counter()
        loss = (model(x) - facts["targets"][which]).square().mean()
        aux = model.memory.aux_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.memory.after_step(optimizer)
        _sync(device)
        step_time += time.perf_counter() - tic
        loss_sum += loss.detach()
        if step % task.log_every == 0:
            usage = model.memory.usage.summary()
            curve.append({"step": step, "loss": float(loss_sum) / task.log_every, **{k: usage[k] for k in CURVE_KEYS}})
            loss_sum.zero_()
        if progress is not None:
            progress()
    restarts = model.memory.addressing.restarts
    return {
        "final": evaluate(model, task, facts, seed),
        "curve": curve,
        "step_ms": 1000 * step_time / task.steps,
        "restarts": 0 if restarts is None else int(restarts.total),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


USAGE_KEYS = ("coverage_ratio", "usage_unweighted", "usage_weighted", "subkey_kl_first", "subkey_kl_second",
              "dead_subkeys")  # fmt: skip
CURVE_KEYS = ("coverage_ratio", "usage_weighted", "dead_subkeys", "subkey_kl_first")
