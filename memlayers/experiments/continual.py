"""``memlayers experiment continual``: can a memory model learn new facts without forgetting the old ones?

A Memory+ model is pretrained on the records of ``old_people`` synthetic persons, then finetuned on the records
of ``new_people`` others in four ways (arms):

* ``full``: every parameter (``build_optimizer``: AdamW, values at 10x the lr);
* ``lora``: LoRA adapters (the ``peft`` library) of rank ``lora_rank`` on every linear layer but the lm head
  (attention, FFN, the memory's query and readout), AdamW; the base frozen;
* ``memory``: the memory's value rows only, every row a step reads (``SparseMemoryFinetuning(top_t=None)``);
* ``sparse_memory``: the ``top_t`` rows a step reads most often relative to the pretraining data (TF-IDF,
  ``memlayers.finetune``; Lin et al., arXiv 2510.15103); both memory arms with lazy Adam (``value_rule``).

Every ``eval_every`` steps: new-fact recall (exact greedy recall of the new people's records), old-fact recall
(the pretrained people's), the pretraining-text loss (next-token loss on the old people's records) and the
held-out-text loss (on the records of ``heldout_people`` who are never trained on: only the format and the value
priors are predictable there). A run stops at the first check (of new-fact recall, every ``check_every`` steps)
that finds it at ``target`` or above, or after ``finetune_steps``; the table compares the arms there (matched
learning). Each arm's learning rate is chosen from its grid ``lrs`` on seed 0: the rate that reaches the target
keeping the most old-fact recall (the highest new-fact recall if none reaches it), the grid extended (at most
twice) past an edge that wins; the other seeds run at that rate. A seed changes the initialisation and both data
orders; the people and their facts stay.

    from memlayers.experiments.continual import run_continual
    rows = run_continual("runs/continual", seeds=3)

Finished runs are reused (pretraining: ``pretrain.seed<s>/``; finetuning: ``<arm>/lr<lr>.seed<s>.json``).
Writes ``results.{json,md}`` and ``learning_vs_forgetting.png`` and prints the table.
"""

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._extras import require
from ..compare.report import aggregate, format_cell
from ..compare.tuning import extend_grid
from ..data.facts import FactsConfig, FactsDataset
from ..data.packing import PackedStream, fixed_batches
from ..evaluate import probe_hits
from ..finetune import Background, SparseMemoryFinetuning, record_background
from ..model import Transformer
from ..model.config import MemorySpec, ModelConfig
from ..optim import build_optimizer
from ..train import atomic_write, lr_multiplier

ARMS = ("full", "lora", "memory", "sparse_memory")


@dataclass
class ContinualTask:
    """The world (``old_people`` pretrained, ``new_people`` finetuned, ``heldout_people`` never trained; records
    of ``choices`` values per attribute), the model (``n_layers`` blocks of width ``dim``, a Memory+ layer in
    the last block with ``memory`` options), pretraining (``pretrain_steps`` of ``batch_size`` x ``seq_len`` at
    ``pretrain_lr``, 10% warmup, cosine to a tenth), the background counts (``background_batches`` batches of
    ``background_batch_size`` pretraining sequences), finetuning (at most ``finetune_steps`` of
    ``finetune_batch_size`` sequences, constant lr, evaluated every ``eval_every`` steps, stopping at the first
    check, every ``check_every`` steps, that finds new-fact recall >= ``target``) and the arms' settings
    (``top_t``, ``value_rule``, ``lora_rank``, lr grids ``lrs``)."""

    old_people: int = 200
    new_people: int = 40
    heldout_people: int = 40
    choices: int = 200
    dim: int = 64
    n_layers: int = 2
    memory: dict = field(default_factory=lambda: dict(n_keys=128, heads=4, topk=8))
    pretrain_steps: int = 560
    pretrain_lr: float = 3e-3
    batch_size: int = 32
    seq_len: int = 64
    background_batches: int = 100
    background_batch_size: int = 4
    finetune_steps: int = 380
    finetune_batch_size: int = 16
    eval_every: int = 100
    check_every: int = 10
    target: float = 0.6
    top_t: int = 500
    value_rule: str = "adam"
    lora_rank: int = 8
    lrs: dict = field(
        default_factory=lambda: {
            "full": [3e-5, 1e-4, 3e-4],
            "lora": [3e-3, 1e-2, 3e-2],
            "memory": [3e-4, 1e-3, 3e-3],
            "sparse_memory": [3e-3, 1e-2, 3e-2],
        }
    )


PRESETS = {"cpu": ContinualTask}


class World:
    """The task's facts: one ``FactsDataset`` (records) of old + new + held-out people, split by index; the
    probes of the old and new people's facts; fixed batches of the old and held-out people's records."""

    def __init__(self, task: ContinualTask):
        people = task.old_people + task.new_people + task.heldout_people
        self.data = FactsDataset(FactsConfig(people=people, formats="records", choices=task.choices))
        old = range(task.old_people)
        new = range(task.old_people, task.old_people + task.new_people)
        self.old_docs, self.new_docs = self.data.documents_of(old), self.data.documents_of(new)
        probes = self.data.probes("records")
        self.old_probes = [p for p in probes if p.person in old]
        self.new_probes = [p for p in probes if p.person in new]
        batches = lambda docs: fixed_batches(PackedStream(docs, task.seq_len, seed=0), batch_size=64)  # noqa: E731
        self.old_batches = batches(self.old_docs)
        self.heldout_batches = batches(self.data.documents_of(range(task.old_people + task.new_people, people)))


def build_model(task: ContinualTask, vocab_size: int) -> Transformer:
    memory = MemorySpec(layers=str(task.n_layers - 1), preset="memory_plus", options=dict(task.memory))
    return Transformer(
        ModelConfig(
            vocab_size=vocab_size,
            dim=task.dim,
            n_layers=task.n_layers,
            n_heads=4,
            max_seq_len=task.seq_len,
            memories=[memory],
        )  # fmt: skip
    )


@torch.no_grad()
def measure(model: nn.Module, world: World) -> dict:
    """In eval mode: new- and old-fact recall, and the mean next-token loss on the old people's records (the
    pretraining text) and on the held-out people's (text neither phase trains on)."""
    was_training = model.training
    model.eval()
    result = {
        "new_recall": _recall(model, world.new_probes),
        "old_recall": _recall(model, world.old_probes),
        "old_loss": _loss(model, world.old_batches),
        "heldout_loss": _loss(model, world.heldout_batches),
    }
    model.train(was_training)
    return result


def _recall(model: nn.Module, probes: list) -> float:
    was_training = model.training
    model.eval()
    recall = probe_hits(model, probes).float().mean().item()
    model.train(was_training)
    return recall


def _loss(model: nn.Module, batches: list) -> float:
    total = count = 0
    for x, y in batches:
        n = (y != -100).sum().item()
        total, count = total + model(x, y).loss.item() * n, count + n
    return total / count


def pretrain(task: ContinualTask, world: World, seed: int, run_dir: str, show: bool) -> Transformer:
    """The pretrained model of ``seed``, from ``run_dir`` when it holds it (else trained and saved there, with the
    background counts beside it, ``background.pt``)."""
    torch.manual_seed(seed)
    model = build_model(task, world.data.vocab_size)
    record_path = os.path.join(run_dir, "record.json")
    settings = json.loads(json.dumps({k: v for k, v in asdict(task).items() if k not in _FINETUNE_ONLY}))
    if os.path.exists(record_path):
        with open(record_path) as f:
            _check_settings(json.load(f), settings, run_dir)
        model.load_state_dict(torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu", weights_only=True))
        return model
    os.makedirs(run_dir, exist_ok=True)
    stream = PackedStream(world.old_docs, task.seq_len, seed=seed)
    optimizer = build_optimizer(model, task.pretrain_lr)
    peak = [g["lr"] for g in optimizer.param_groups]
    warmup = max(1, task.pretrain_steps // 10)
    tqdm = require("tqdm", "train").tqdm
    tic = time.perf_counter()
    for step in tqdm(range(task.pretrain_steps), desc=f"pretrain.seed{seed}", leave=False, disable=not show):
        scale = lr_multiplier(step + 1, task.pretrain_steps, warmup, min_lr_ratio=0.1)  # the trainer's schedule
        for group, lr in zip(optimizer.param_groups, peak):
            group["lr"] = lr * scale
        x, y = stream.batch(step, task.batch_size)
        out = model(x, y)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    background_stream = PackedStream(world.old_docs, task.seq_len, seed=seed + 1_000)
    batches = [background_stream.batch(i, task.background_batch_size)[0] for i in range(task.background_batches)]
    record_background(model, batches).save(os.path.join(run_dir, "background.pt"))
    atomic_write(os.path.join(run_dir, "model.pt"), lambda f: torch.save(model.state_dict(), f))
    record = {"settings": settings, "seconds": time.perf_counter() - tic}  # written last: the run is complete
    atomic_write(record_path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    return model


_FINETUNE_ONLY = ("finetune_steps", "finetune_batch_size", "eval_every", "check_every", "target", "top_t", "value_rule",
                  "lora_rank", "lrs")  # fmt: skip


def _check_settings(saved: dict, settings: dict, path: str) -> None:
    if saved.get("settings") != settings:
        raise ValueError(f"{path} was run with other settings; use another --out, or delete it to run it again")


def prepare_arm(arm: str, model: Transformer, task: ContinualTask, background: Background, lr: float):
    """(model to train, optimizer, the sparse finetuning helper or None, trainable parameter count)."""
    smf = None
    if arm == "full":
        optimizer = build_optimizer(model, lr, weight_decay=0.0)
    elif arm == "lora":
        peft = require("peft", "hf")
        targets = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"})
        config = peft.LoraConfig(r=task.lora_rank, lora_alpha=2 * task.lora_rank, target_modules=targets)
        model = peft.inject_adapter_in_model(config, model)  # freezes everything but the adapters
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    elif arm in ("memory", "sparse_memory"):
        smf = SparseMemoryFinetuning(model, background, task.top_t if arm == "sparse_memory" else None)
        optimizer = smf.optimizer(lr, rule=task.value_rule)
    else:
        raise ValueError(f"experiment continual: unknown arm {arm!r}; arms are {', '.join(ARMS)}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, optimizer, smf, trainable


def finetune(task, world, pretrained, background, arm, lr, seed, before, show) -> dict:
    """One finetuning run of ``arm`` at ``lr``: its curve and the point where it stops."""
    torch.manual_seed(seed)
    model, optimizer, smf, trainable = prepare_arm(arm, copy.deepcopy(pretrained), task, background, lr)
    model.train()
    stream = PackedStream(world.new_docs, task.seq_len, seed=seed)
    curve = [{"step": 0, **before}]
    tic = time.perf_counter()
    for step in range(1, task.finetune_steps + 1):
        x, y = stream.batch(step - 1, task.finetune_batch_size)
        out = model(x, y)
        (out.loss + out.aux_loss).backward()
        if smf is not None:
            smf.select_rows()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        learned = step % task.check_every == 0 and _recall(model, world.new_probes) >= task.target
        if learned or step % task.eval_every == 0 or step == task.finetune_steps:
            curve.append({"step": step, **measure(model, world)})
        if learned:
            break
    end = curve[-1]
    if show:
        print(f"{arm}, lr {lr:g}, seed {seed}: step {end['step']:.0f}, new-fact recall {end['new_recall']:.1%}, old "
              f"{end['old_recall']:.1%} ({time.perf_counter() - tic:.0f} s)", file=sys.stderr)  # fmt: skip
    return {
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "steps": end["step"],
        "reached": float(end["new_recall"] >= task.target),  # a float: the table shows the share of seeds
        "new_recall": end["new_recall"],
        "old_recall": end["old_recall"],
        "old_retained": end["old_recall"] / before["old_recall"] if before["old_recall"] > 0 else None,
        "old_loss": end["old_loss"],
        "heldout_loss": end["heldout_loss"],
        "trainable": trainable,
        "seconds": time.perf_counter() - tic,
        "curve": curve,
    }


def _cached(path: str, settings: dict, run) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        _check_settings(saved, settings, path)
        return saved
    result = {**run(), "settings": settings}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    return result


def choose_lr(runs: list[dict]) -> dict:
    """The run whose lr an arm keeps: among those reaching the target the most old-fact recall kept (then the
    fewest steps); if none does, the highest new-fact recall (then the largest lr)."""
    reached = [r for r in runs if r["reached"]]
    if reached:
        return max(reached, key=lambda r: (r["old_recall"], -r["steps"]))
    return max(runs, key=lambda r: (r["new_recall"], r["lr"]))


COLUMNS = [
    ("lr", "lr", "{:g}"),
    ("steps", "steps", "{:.0f}"),
    ("reached", "reached target", "{:.0%}"),
    ("new_recall", "new-fact recall", "{:.1%}"),
    ("old_recall", "old-fact recall", "{:.1%}"),
    ("old_retained", "old retained", "{:.1%}"),
    ("old_loss", "pretraining-text loss", "{:.3f}"),
    ("heldout_loss", "held-out-text loss", "{:.3f}"),
    ("trainable", "trained params", "{:,.0f}"),
]


def format_markdown(rows: list[dict], before: dict) -> str:
    """One line per arm (mean ± std over seeds), after a line for the pretrained model."""
    head = ["arm", *[title for _, title, _ in COLUMNS], "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in [before, *rows]:
        row = {k: v for k, v in row.items() if k not in ("lr_std", "trainable_std")}  # the same for every seed
        lines.append(
            f"| {row['arm']} | " + " | ".join(format_cell(row, k, f) for k, _, f in COLUMNS) + f" | {row['seeds']} |"
        )
    return "\n".join(lines)


PANELS = [
    ("old_recall", "old-fact recall (%)", 100.0, False),
    ("old_loss", "pretraining-text loss change", 1.0, True),
    ("heldout_loss", "held-out-text loss change", 1.0, True),
]  # (key, title, scale, relative to the start)


def write_plot(runs: list[dict], target: float, path: str) -> str:
    """``learning_vs_forgetting.png``: old-fact recall, and the change of the pretraining-text and held-out-text
    losses (nats/token), against new-fact recall along each run's finetuning, one line per (arm, seed)."""
    matplotlib = require("matplotlib", "train")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.5))
    colors = dict(zip(ARMS, ("tab:red", "tab:orange", "tab:blue", "tab:green")))
    for run in runs:
        curve = run["curve"]
        x = [100 * p["new_recall"] for p in curve]
        label = run["arm"] if run["seed"] == min(r["seed"] for r in runs if r["arm"] == run["arm"]) else None
        for ax, (key, _, scale, relative) in zip(axes, PANELS):
            y = [scale * (p[key] - (curve[0][key] if relative else 0.0)) for p in curve]
            ax.plot(x, y, color=colors[run["arm"]], marker=".", label=label, alpha=0.8)
    for ax, (_, title, _, _) in zip(axes, PANELS):
        ax.axvline(100 * target, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="new-fact recall (%)", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("continual learning: learning vs forgetting (one line per arm and seed; losses in nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_continual(
    out_dir: str, arms=None, seeds: int = 3, preset: str = "cpu", show: bool = True, task: ContinualTask | None = None
) -> list[dict]:
    """Run (or reuse) the pretraining of every seed, the lr choice on seed 0 and every (arm, seed); write and print
    the table; return its rows (one per arm, aggregated over seeds)."""
    if preset not in PRESETS:
        raise ValueError(f"experiment continual: unknown preset {preset!r}; choose one of {tuple(PRESETS)}")
    task = task or PRESETS[preset]()
    arms = list(ARMS) if arms is None else list(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(
            f"experiment continual: unknown arm(s) {', '.join(map(repr, unknown))}; arms are {', '.join(ARMS)}"
        )
    if seeds < 1:
        raise ValueError(f"experiment continual: seeds must be >= 1, got {seeds}")
    if "lora" in arms:
        require("peft", "hf")  # before hours of pretraining
    world = World(task)
    settings = json.loads(json.dumps(asdict(task)))
    runs, befores = [], []
    chosen: dict[str, float] = {}
    for seed in range(seeds):
        tic = time.perf_counter()
        pre_dir = os.path.join(out_dir, f"pretrain.seed{seed}")
        model = pretrain(task, world, seed, pre_dir, show)
        background = Background.load(os.path.join(pre_dir, "background.pt"))
        before = measure(model, world)
        befores.append({"arm": "pretrained", "seed": seed, **before})
        if show:
            print(f"pretrained seed {seed}: old-fact recall {before['old_recall']:.1%} "
                  f"({time.perf_counter() - tic:.0f} s)", file=sys.stderr)  # fmt: skip
        for arm in arms:

            def run_at(lr: float, arm=arm) -> dict:
                path = os.path.join(out_dir, arm, f"lr{lr:g}.seed{seed}.json")
                run = lambda: finetune(task, world, model, background, arm, lr, seed, before, show)  # noqa: E731
                return _cached(path, settings, run)

            if arm in chosen:
                best = run_at(chosen[arm])
            else:  # seed 0: the grid, extended past a winning edge
                tried = extend_grid({lr: run_at(lr) for lr in task.lrs[arm]}, run_at,
                                    lambda runs: choose_lr(list(runs.values()))["lr"])  # fmt: skip
                best = choose_lr(list(tried.values()))
                chosen[arm] = best["lr"]
            runs.append({k: v for k, v in best.items() if k != "settings"})
    rows = aggregate([{k: v for k, v in r.items() if k != "curve"} for r in runs])
    before = aggregate(befores)[0]
    table = format_markdown(rows, before)
    os.makedirs(out_dir, exist_ok=True)
    result = {"task": settings, "lrs": chosen, "pretrained": before, "arms": rows}
    atomic_write(os.path.join(out_dir, "results.json"), lambda f: f.write(json.dumps(result, indent=1).encode()))
    atomic_write(os.path.join(out_dir, "results.md"), lambda f: f.write((table + "\n").encode()))
    write_plot(runs, task.target, os.path.join(out_dir, "learning_vs_forgetting.png"))
    print(f"\ncontinual learning ({seeds} seed{'s' if seeds > 1 else ''}; compared at new-fact recall >= "
          f"{task.target:.0%}):\n{table}")  # fmt: skip
    return rows


__all__ = ["ARMS", "PRESETS", "ContinualTask", "run_continual"]
