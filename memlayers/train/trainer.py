"""The training loop: ``train(cfg, out_dir)`` trains, logs, checkpoints, resumes and evaluates one run.

    from memlayers.train import load_config, train
    result = train(load_config("run.yaml", ["train.steps=2000"]), "runs/memory_plus")

out_dir/ holds:
    config.yaml      the resolved RunConfig (vocab_size, value_lr_ratio filled in), written when the run starts
    metrics.jsonl    one JSON object per logged step (see ``train``)
    checkpoint.pt    the latest checkpoint (``memlayers.train.checkpoint``), replaced atomically
    checkpoints/     under torchrun, the tensors of the checkpoint, every process's part (``sharded_checkpoint``)
    result.json      the final summary, written atomically: its presence means the run finished
    curves.png       loss (and recall) against training tokens, written when the run finishes
    .memlayers.lock  held while a process trains here (``memlayers.train.lock``)
    tb/              TensorBoard scalars, when ``train.tensorboard``
    prev/<n>/        what each ``train(..., force=True)`` moved out of the way

Resume: rerunning ``train`` on the same out_dir continues from checkpoint.pt when the configs match
(else ``ConfigMismatchError`` listing the differing keys, and no file is touched), or just returns
result.json when the run had finished. Exact: batches are a pure function of the step index, and the
checkpoint holds the model, optimizer, RNG states, usage trackers and the loop's own state, so the
losses after a resume equal an uninterrupted run's bit for bit (on CPU; tested). A larger
``train.steps`` (alone) extends a run; ``train.init_from`` starts one from another run's weights.
A NaN or infinite loss or gradient stops the run (``NonFiniteError``) before anything non-finite is
logged or saved.
"""

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .._extras import missing_extra

try:
    from tqdm import tqdm
except ModuleNotFoundError as e:  # `pip install memlayers` is the layer library only: name the extra to install
    raise (missing_extra(e, "train") or e) from None

from ..data import build_dataset
from ..distributed.launch import agree, join
from ..distributed.plan import OneProcess
from ..memory.parts import MemoryPart
from ..model import Transformer
from ..optim import VALUE_LR_RATIOS, FusedRowOptimizer, build_optimizer, clip_grad_norms, lr_decay_scale, set_lr
from .checkpoint import (
    CHECKPOINT,
    CheckpointError,
    ConfigMismatchError,
    NonFiniteError,
    atomic_write,
    load_checkpoint,
    load_usage_state,
    read_checkpoint,
    remove_stale_tmp,
    rng_state,
    save_checkpoint,
    set_rng_state,
    usage_state,
    write_errors,
)
from .config import RunConfig, config_diff, load_config, read_yaml, save_config
from .lock import lock_run_dir
from .plots import CURVES, write_curves
from .sharded_checkpoint import SHARDS, load_sharded, remove_stale_shards, save_sharded

CONFIG, METRICS, RESULT = "config.yaml", "metrics.jsonl", "result.json"
# keys that may change between a run and its resume (they do not change what is computed, up to rounding)
RUNTIME_KEYS = ("train.progress", "train.tensorboard", "train.threads", "parallel.memory", "parallel.sharding")
# the key that may grow between a run and its resume: the run is extended (see ``train``)
EXTEND_KEY = "train.steps"
FINAL_LOSS_LOGS = 5  # result["final_loss"]: mean of the last this-many logged losses

Evaluate = Callable[..., dict]


def lr_multiplier(step: int, steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Learning-rate factor of optimizer step ``step`` (1-based): linear warmup to 1 at ``step == warmup``,
    then cosine decay to ``min_lr_ratio`` at ``step == steps``. A warmup longer than the run is cut to
    ``steps`` (a short run of a long config still reaches the peak lr)."""
    warmup = min(warmup, steps)
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``name`` ("auto", "cpu", "cuda", "cuda:1", ...) as a usable device; ValueError naming ``key`` otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}: {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}: {name!r} but CUDA is not available on this machine; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{key}: {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 on CUDA for "auto", else float32 (no autocast)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def train(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    *,
    evaluate: Evaluate | None | bool = None,
    progress: bool | None = None,
    force: bool = False,
) -> dict:
    """Train ``cfg`` in ``out_dir`` (created if needed), resuming from its checkpoint if there is one.

    evaluate: ``evaluate(model, dataset, *, limit, batch_size, seq_len) -> dict[str, float]``, called every
        ``train.eval_every`` steps with ``limit=train.eval_limit`` and once at the end with ``limit=None``;
        None = ``memlayers.evaluate.evaluate``; False = no evaluation at all. It runs under the training
        autocast, and the RNG states are restored afterwards, so evaluating never changes the training.
    progress: show the tqdm bar (None = ``train.progress``).
    force: start over even if out_dir holds a finished or different run (its files move to out_dir/prev/<n>/).

    Returns the result dict (also out_dir/result.json): config, steps, tokens, final_loss, wall_time,
    train_time, tokens_per_s, eval (the final evaluation), accounting (``memlayers.accounting.account``),
    device, dtype, resumes.

    metrics.jsonl lines: ``step`` (optimizer steps done), ``tokens``, ``elapsed`` (s, wall clock, summed over
    resumes); on log steps also ``loss`` (mean LM loss since the previous log), ``aux_loss`` (MoE models and
    memories with an auxiliary loss), ``lr`` and ``value_lr`` (peak-scaled lrs of the base and value groups),
    ``grad_norm`` and ``value_grad_norm`` (before clipping), ``tokens_per_s`` (since the previous log, training
    time only);
    on eval steps ``eval/<name>`` for every evaluate() output.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"train: cfg must be a RunConfig (see memlayers.train.load_config), got {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    out_dir = Path(out_dir)
    show = t.progress if progress is None else progress
    if t.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            "lower train.seq_len or raise model.max_seq_len"
        )
    if t.tensorboard:
        _summary_writer_class()  # fail before touching anything when tensorboard is missing
    device, started = join(resolve_device(t.device), cfg.parallel.memory)  # torchrun's processes, if any
    dtype = resolve_dtype(t.dtype, device)
    probes = evaluate is None  # the default evaluator runs the dataset's recall probes
    if evaluate is None:
        from ..evaluate import evaluate

    threads = torch.get_num_threads()
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    try:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if t.batch_size % world:
            raise ValueError(
                f"train.batch_size={t.batch_size} (the global batch) does not split over {world} processes; use a "
                f"multiple of {world}"
            )
        _seed_everything(t.seed)
        dataset = build_dataset(cfg.data)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = dataset.vocab_size
        elif cfg.model.vocab_size < dataset.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's vocabulary "
                f"({dataset.vocab_size}); set model.vocab_size=null to take it from the dataset"
            )
        if cfg.train.value_lr_ratio is None:  # saved as the number used: a new default cannot change a resumed run
            cfg.train.value_lr_ratio = VALUE_LR_RATIOS[cfg.train.value_optimizer]
        _check_buildable(cfg, dataset, probes)  # before anything is written or archived
        init = _init_weights(cfg) if t.init_from and not out_dir.exists() else None  # a new run: check it first
        with contextlib.ExitStack() as held:
            checkpoint = {}

            def prepare():  # rank 0 alone decides, holding the directory's lock for the whole run
                _make_dir(out_dir)
                held.enter_context(lock_run_dir(out_dir))
                kind, saved = _prepare_out_dir(out_dir, cfg.to_dict(), force)
                if kind == "resume":  # read by every process from the file, not sent
                    checkpoint["saved"], saved = saved, None
                return kind, saved

            kind, saved = agree(prepare)
            if kind == "finished":
                if show and os.environ.get("RANK", "0") == "0":
                    print(f"{out_dir}: finished already (step {saved['steps']}); its result is reused (--force starts "
                          "over, a larger train.steps extends it)", file=sys.stderr)  # fmt: skip
                return saved
            if kind == "resume":
                saved = checkpoint.get("saved") or read_checkpoint(out_dir / CHECKPOINT)
            if t.init_from and kind != "resume" and init is None:  # (a resumed run has its own weights)
                init = _init_weights(cfg)
            if kind == "force":
                agree(lambda: _archive(out_dir))
            return _Run(cfg, out_dir, dataset, device, dtype, evaluate, show, saved, init).run()
    finally:
        torch.set_num_threads(threads)
        if started:
            if sys.exc_info()[0] is None:  # every process done before any tears its connections down (gloo aborts)
                dist.barrier()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------


def _check_buildable(cfg: RunConfig, dataset, probes: bool) -> None:
    """Fail early on what would only fail later: the model and optimizer must build (on the meta device:
    no memory, no time), and (``probes``) every recall probe must fit in the model's context."""
    with torch.device("meta"):
        t = cfg.train
        build_optimizer(Transformer(cfg.model), lr=t.lr, value_optimizer=t.value_optimizer, fused_values=t.fused_values)
    if not probes:
        return
    longest = max((len(p.prompt) + len(p.answer) - 1 for f in dataset.probe_formats for p in dataset.probes(f)),
                  default=0)  # fmt: skip
    if longest > cfg.model.max_seq_len:
        raise ValueError(
            f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the longest recall probe ({longest} tokens) "
            f"of the data's formats {dataset.probe_formats}; raise model.max_seq_len to >= {longest}"
        )


def _init_weights(cfg: RunConfig) -> dict:
    """The model weights of ``train.init_from`` (a run directory, checkpoint or exported .safetensors file),
    checked against ``cfg.model``."""
    path = cfg.train.init_from
    try:
        saved, model, _ = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as e:
        raise type(e)(f"train.init_from: {e}") from None
    weights = model.state_dict()
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(cfg.model).state_dict().items()}
    if expected != {k: v.shape for k, v in weights.items()}:
        diff = config_diff(saved.to_dict()["model"], cfg.to_dict()["model"])
        keys = ", ".join(f"model.{k}" for k, _, _ in diff) or "the parameter names or shapes"
        raise CheckpointError(
            f"train.init_from={path}: its weights do not fit this model (differing: {keys}); "
            "use the same model config as that run"
        )
    return weights


def _make_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output directory {out_dir} is a file; choose a directory (it is created if needed)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the output directory {out_dir}: {e.strerror}; choose another") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard (or the 'all' extra) "
            "(or set train.tensorboard=false; metrics.jsonl is always written)"
        ) from None
    return SummaryWriter


def _mismatch(out_dir: Path, source: str, diff) -> ConfigMismatchError:
    lines = "\n".join(f"  {key}: saved {a!r}, requested {b!r}" for key, a, b in diff)
    return ConfigMismatchError(
        f"{out_dir} holds a run with another config ({source}); {len(diff)} key(s) differ:\n{lines}\n"
        "Nothing was changed. Use another out_dir, request the saved config, or pass force=True "
        "(--force) to start over (the old files move to out_dir/prev/<n>/)."
    )


def _prepare_out_dir(out_dir: Path, requested: dict, force: bool):
    """Check out_dir before anything is written. Returns ("finished", saved result), ("resume", checkpoint
    dict), ("fresh", None) or ("force", None) (fresh, once the old files are archived). Raises, touching
    nothing, on a config mismatch, an unreadable checkpoint or an edited config.yaml. A request that
    differs only by a larger ``train.steps`` extends the run: it resumes from the checkpoint (a finished
    run's result.json moves to prev/<n>/)."""
    result, ckpt_path, config = out_dir / RESULT, out_dir / CHECKPOINT, out_dir / CONFIG
    if force:
        return "force", None
    extend = False
    if result.is_file():
        try:
            saved = json.loads(result.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{result}: unreadable result ({e}); delete it to redo the end of the run") from None
        diff = config_diff(saved.get("config", {}), requested, RUNTIME_KEYS)
        extend = _extends(diff, saved.get("steps", 0))
        if diff and not extend:
            raise _mismatch(out_dir, RESULT, diff)
        if not extend:
            _check_config_file(out_dir, saved["config"], requested)
            if not config.is_file():
                save_config(RunConfig.from_dict(saved["config"]), config)
            return "finished", saved
    if ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path)
        diff = config_diff(ckpt["config"], requested, RUNTIME_KEYS)
        if diff and not _extends(diff, ckpt["step"]):
            raise _mismatch(out_dir, CHECKPOINT, diff)
        _check_config_file(out_dir, ckpt["config"], requested)
        if extend:
            _archive(out_dir, [RESULT])
        return "resume", ckpt
    if extend:
        raise CheckpointError(f"{out_dir} has a result but no {CHECKPOINT} to extend the run from; use --force")
    if config.is_file():  # started, killed before its first checkpoint: restart only if it is the same run
        try:
            saved = load_config(config).to_dict()
        except ValueError as e:
            raise ConfigMismatchError(f"{config}: unreadable saved config ({e}); use another out_dir or force")
        diff = config_diff(saved, requested, RUNTIME_KEYS)
        if diff:
            raise _mismatch(out_dir, CONFIG, diff)
    return "fresh", None


def _extends(diff, done: int) -> bool:
    """Is ``diff`` (saved vs requested) only a larger ``train.steps``? Refuses a smaller one."""
    if [key for key, _, _ in diff] != [EXTEND_KEY]:
        return False
    _, saved, wanted = diff[0]
    if wanted < saved:
        raise ConfigMismatchError(
            f"{EXTEND_KEY}={wanted} but the run was set to {saved} steps ({done} done); a run can be extended, not "
            f"shortened: pass train.steps >= {saved}, or --force to start over"
        )
    return True


def _check_config_file(out_dir: Path, saved: dict, requested: dict) -> None:
    """config.yaml records the run's config; it is never read back, so an edit would be ignored: refuse one
    that matches neither the saved config nor the requested one (an extension writes the new steps in it
    before its first checkpoint)."""
    path = out_dir / CONFIG
    if not path.is_file():
        return  # deleted: rewritten
    try:
        written = read_yaml(path)  # as written: the keys it lacks read as in config_diff
        diff = config_diff(saved, written, RUNTIME_KEYS)
        if diff and not config_diff(requested, written, RUNTIME_KEYS):
            diff = []
    except ValueError as e:
        diff = [(f"(unreadable: {e})", None, None)]
    if diff:
        raise ConfigMismatchError(
            f"{path} was edited ({', '.join(key for key, _, _ in diff)}), but the run's config is the one saved with "
            "its checkpoint and config.yaml is only a record of it. To train with other settings pass them as "
            "--config/overrides (a larger train.steps extends the run; anything else needs --force or another "
            "--out); delete config.yaml to have it rewritten. Nothing was changed"
        )


def _archive(out_dir: Path, names: list[str] = (RESULT, CHECKPOINT, SHARDS, METRICS, CONFIG, CURVES, "tb")) -> None:
    """Move the previous run's files into a new out_dir/prev/<n>/ (earlier archives are kept)."""
    names = [n for n in names if (out_dir / n).exists()]
    if not names:
        return
    n = 0
    while (out_dir / "prev" / str(n)).exists():
        n += 1
    prev = out_dir / "prev" / str(n)
    prev.mkdir(parents=True)
    for name in names:
        os.replace(out_dir / name, prev / name)


def strict_json(data, **kwargs) -> str:
    """JSON that strict parsers accept: NaN and infinities become null."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), allow_nan=False, **kwargs)


def _to_builtin(x):
    if is_dataclass(x) and not isinstance(x, type):
        return {k: _to_builtin(v) for k, v in asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): _to_builtin(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_builtin(v) for v in x]
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    return x


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run stopped and how to resume it."""


class _Run:
    """One training session of a run (fresh or resumed); ``run()`` returns the result dict."""

    def __init__(self, cfg: RunConfig, out_dir: Path, dataset, device, dtype, evaluate, show: bool, ckpt, init):
        self.cfg, self.t, self.out_dir, self.dataset = cfg, cfg.train, out_dir, dataset
        self.device, self.dtype, self.evaluate, self.show = device, dtype, evaluate, show
        t = self.t
        torch.manual_seed(t.seed)  # the model's init does not depend on what building the dataset drew
        self.model = Transformer(cfg.model).to(device)
        weights = ckpt.get("model") if ckpt is not None else init  # (a sharded checkpoint loads in _load)
        if weights is not None:  # one process's weights, before the model is laid out over processes
            self._checkpoint_fits(lambda: self.model.load_state_dict(weights))
        for part in self.model.modules():  # e.g. engram with canonical_ids folds tokens that read alike
            if isinstance(part, MemoryPart):
                part.bind_tokenizer(dataset.tokenizer.decode)
        self.plan = OneProcess()
        if dist.is_initialized():
            from ..distributed import parallelize

            bf16 = device.type == "cuda" and dtype == torch.bfloat16  # FSDP2's bf16 parameters beside autocast
            self.plan = parallelize(self.model, cfg.parallel.memory, cfg.parallel.sharding, mixed_precision=bf16)
        self.main = self.plan.is_main  # the process that writes the run's files
        self.optimizer = build_optimizer(
            self.model,
            lr=t.lr,
            weight_decay=t.weight_decay,
            betas=(t.beta1, t.beta2),
            value_lr_ratio=t.value_lr_ratio,
            value_optimizer=t.value_optimizer,
            fused_values=t.fused_values,
        )
        self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.step, self.tokens = 0, 0
        self.loss_sum = torch.zeros((), device=device)  # LM loss summed over the steps since the last log
        self.aux_sum = torch.zeros((), device=device)
        self.loss_count = 0
        self.recent_losses: deque = deque(maxlen=FINAL_LOSS_LOGS)
        self.elapsed = self.train_time = 0.0  # from earlier sessions
        self.resumes = 0
        self.final_eval = None
        self.steps_history = [t.steps]  # train.steps of each session that changed it (extensions)
        self.saved_step = None  # step of the last checkpoint written or loaded
        self.saved_shards = None  # its "shards", if it is a sharded one
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # first step with NaN/inf, 0 if none
        self.has_aux = bool(getattr(cfg.model.moe, "layers", "")) or any(
            layer.aux_loss() is not None for _, layer in self.model.memory_layers()
        )  # MoE balancing or a memory's own auxiliary loss (UltraMem's core penalty)
        if ckpt is not None:
            self._load(ckpt)
        self.metrics = self.tb = None
        if not self.main:
            return
        remove_stale_tmp(out_dir, (CHECKPOINT, RESULT, CONFIG, CURVES))
        save_config(cfg, out_dir / CONFIG)  # also restores a deleted one; an extension records its new steps
        metrics = out_dir / METRICS
        offset = 0
        if ckpt is not None:
            offset = ckpt["trainer"]["metrics_offset"]
            size = metrics.stat().st_size if metrics.exists() else 0
            if size < offset:
                warnings.warn(f"{metrics} is shorter than at the checkpoint ({size} < {offset} bytes); lines are lost")
                offset = size
        with write_errors(metrics):
            with open(metrics, "ab") as f:  # drop what was logged after the checkpoint
                f.truncate(offset)
            self.metrics = open(metrics, "ab")  # noqa: SIM115 (open for the whole run, closed in run())
        if t.tensorboard:
            self.tb = _summary_writer_class()(str(out_dir / "tb"), purge_step=self.step + 1 if self.step else None)

    # ---- state

    def _checkpoint_fits(self, load) -> None:
        try:
            load()
        except CheckpointError:  # (damaged files: its own message)
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{self.out_dir / CHECKPOINT}: does not fit the model and optimizer of its own config "
                f"({str(e).splitlines()[0]}); was it written by another memlayers version? Use another out_dir"
            ) from None

    def _load(self, ckpt: dict) -> None:
        """Everything but a whole checkpoint's model weights (loaded before the model is laid out over processes)."""
        if "shards" in ckpt:
            self._checkpoint_fits(lambda: load_sharded(ckpt, self.model, self.optimizer, self.plan))
            self.saved_shards = ckpt["shards"]
        else:
            self._checkpoint_fits(lambda: self.plan.load_optimizer_state(self.optimizer, ckpt["optimizer"]))
        load_usage_state(self.model, ckpt["usage"])
        self.plan.loaded_usage(self.model)
        set_rng_state(ckpt["rng"])
        tr = ckpt["trainer"]
        self.step, self.tokens = int(ckpt["step"]), int(ckpt["tokens"])
        self.loss_sum = tr["loss_sum"].to(self.device)
        self.aux_sum = tr["aux_sum"].to(self.device)
        self.loss_count = int(tr["loss_count"])
        self.recent_losses.extend(tr["recent_losses"])
        self.elapsed, self.train_time = float(tr["elapsed"]), float(tr["train_time"])
        self.resumes = int(tr["resumes"]) + 1
        self.final_eval = tr["final_eval"]
        self.steps_history = list(tr.get("steps_history", [ckpt["config"]["train"]["steps"]]))
        if self.steps_history[-1] != self.t.steps:  # extended: the end moved, so has the final evaluation
            self.steps_history.append(self.t.steps)
            self.final_eval = None
        self.saved_step = self.step

    def _save(self, elapsed: float, train_time: float) -> None:
        """Write a checkpoint: one file from one process, a sharded one from many (every process its part)."""
        with self.plan.global_usage(self.model):
            usage = usage_state(self.model)
        meta = None

        def flush():  # the metrics up to here, durable before a checkpoint names their length
            with write_errors(self.metrics.name):
                self.metrics.flush()
                os.fsync(self.metrics.fileno())

        agree(flush)  # (a failure raised on every process: none left waiting in the save's collectives)
        if self.main:
            meta = {
                "config": self.cfg.to_dict(),
                "step": self.step,
                "tokens": self.tokens,
                "rng": rng_state(),
                "usage": usage,
                "trainer": {
                    "metrics_offset": self.metrics.tell(),
                    "loss_sum": self.loss_sum.detach().cpu(),
                    "aux_sum": self.aux_sum.detach().cpu(),
                    "loss_count": self.loss_count,
                    "recent_losses": list(self.recent_losses),
                    "elapsed": elapsed,
                    "train_time": train_time,
                    "resumes": self.resumes,
                    "final_eval": self.final_eval,
                    "steps_history": self.steps_history,
                },
            }
        if self.plan.world > 1:  # collective; at the step of the last checkpoint its tensors are reused
            reuse = self.saved_shards if self.saved_step == self.step else None
            self.saved_shards = save_sharded(self.out_dir, meta, self.model, self.optimizer, self.plan, reuse)
        else:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            save_checkpoint(self.out_dir / CHECKPOINT, {**meta, **state})
            remove_stale_shards(self.out_dir)  # of an earlier session on many processes
        self.saved_step = self.step

    # ---- pieces of a step

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _set_lr(self, step: int) -> float:
        t = self.t
        mult = lr_multiplier(step, t.steps, t.warmup, t.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            set_lr(group, base * mult * lr_decay_scale(group.get("lr_decay"), step, t.steps))
        return mult

    def _lrs(self) -> dict:
        out = {}
        for group in self.optimizer.param_groups:
            key = "value_lr" if group.get("name") == "values" else "lr"
            out.setdefault(key, float(group["lr"]))
        return out

    def _train_step(self, forward) -> tuple:
        """One optimizer step on batch ``self.step`` (0-based index = steps done before it)."""
        t = self.t
        x, y = self.dataset.train_batch(self.step, t.batch_size * t.grad_accum, t.seq_len)  # (A*B, T) each
        x, y = x.view(t.grad_accum, t.batch_size, -1), y.view(t.grad_accum, t.batch_size, -1)
        total = max(1, int((y != -100).sum()))  # the step's targets, over every process
        mine = self.plan.batch_rows(t.batch_size)  # this process's rows of each micro-batch
        x, y = x[:, mine].to(self.device, non_blocking=True), y[:, mine].to(self.device, non_blocking=True)
        counts = (y != -100).sum(dim=(1, 2)).tolist()  # this process's targets per micro-batch
        step_loss = torch.zeros((), device=self.device)
        step_aux = torch.zeros((), device=self.device)
        for i in range(t.grad_accum):
            with self._autocast():
                out = forward(x[i], y[i])
            # each micro-batch's mean loss weighted by its share of the step's targets: the gradients sum to
            # those of the mean over the whole step batch, whatever grad_accum and the number of processes
            weight = counts[i] / total
            lm = out.loss.float() * weight
            aux = out.aux_loss.float() / (t.grad_accum * self.plan.world)
            # a fused value update collects the micro-batches' parts and applies them at the last backward; on
            # many processes at the step, once every replica's parts are gathered (reduce_value_grads)
            in_backward = i == t.grad_accum - 1 and self.plan.world == 1
            with contextlib.nullcontext() if in_backward or not t.fused_values else self.optimizer.accumulate():
                (lm + aux).backward()
            step_loss += lm.detach()
            step_aux += aux.detach()
        self.plan.reduce_value_grads(self.optimizer)
        norms = clip_grad_norms(self.model, t.clip, t.value_clip, norm_fn=self.plan.grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for _, layer in self.model.memory_layers():
            layer.after_step(self.optimizer)
        if t.fused_values:  # the values got no gradients: their norm is that of what the fused update applied
            norms = (norms[0], self.plan.update_norm(self._fused_values().applied()))
        # no host sync: the first bad step is remembered on the device and checked before anything is logged
        # or saved (a norm of no gradients is a CPU zero: left out, it is finite and would cost a copy)
        finite = torch.isfinite(step_loss + step_aux)
        for norm in norms:
            if norm.device == finite.device:
                finite &= torch.isfinite(norm)
        self.first_bad = torch.where((self.first_bad == 0) & ~finite, self.step + 1, self.first_bad)
        return step_loss, step_aux, norms

    def _fused_values(self) -> FusedRowOptimizer:
        return next(o for o in self.optimizer.optimizers if isinstance(o, FusedRowOptimizer))

    def _check_finite(self) -> None:
        """Stop a diverged run (``NonFiniteError``) before it logs or saves anything non-finite."""
        bad = int(self.plan.max(self.first_bad))
        if not bad:
            return
        kept = "no checkpoint was written"
        if self.saved_step:
            kept = f"the last good checkpoint (step {self.saved_step}) is kept"
        fp32 = "" if self.dtype == torch.float32 else " or train in float32 (train.dtype=float32)"
        raise NonFiniteError(
            f"training diverged: the loss or a gradient was NaN or infinite at step {bad}; stopped at step "
            f"{self.step}, {kept}. Lower train.lr, enable clipping (train.clip, train.value_clip){fp32}, then "
            "start over (--force or another --out)"
        )

    def _eval(self, limit: int | None) -> dict:
        state = rng_state()
        self.model.eval()
        try:
            with self._autocast(), self.plan.global_usage(self.model):
                out = self.evaluate(
                    self.model, self.dataset, limit=limit, batch_size=self.t.batch_size, seq_len=self.t.seq_len
                )
        finally:
            set_rng_state(state)
            self.model.train()
        return {str(k): float(v) for k, v in _to_builtin(out).items()}

    def _write(self, record: dict) -> None:
        if not self.main:
            return
        with write_errors(self.metrics.name):
            self.metrics.write((strict_json(record) + "\n").encode())
            self.metrics.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    # ---- the loop

    def run(self) -> dict:
        t, model = self.t, self.model
        model.train()
        forward = torch.compile(model) if t.compile else model
        start_step = self.step
        session_start = time.perf_counter()
        log_time, log_tokens = 0.0, 0  # training time and tokens since the last log
        bar = tqdm(
            total=t.steps,
            initial=start_step,
            disable=not (self.show and self.main),
            desc=self.out_dir.name,
            unit="step",
            leave=False,
        )
        try:
            while self.step < t.steps:
                step = self.step + 1
                tic = time.perf_counter()
                self._set_lr(step)
                step_loss, step_aux, norms = self._train_step(forward)
                self.step, self.tokens = step, self.tokens + t.tokens_per_step
                self.loss_sum += step_loss
                self.aux_sum += step_aux
                self.loss_count += 1
                last = step == t.steps
                log = step % t.log_every == 0 or last
                evaluate = self.evaluate is not False and not last and t.eval_every and step % t.eval_every == 0
                save = step % t.ckpt_every == 0 or last
                if log or evaluate or save:
                    self._check_finite()  # nothing non-finite is logged, evaluated or saved
                record = {}
                if log:
                    loss = (self.plan.sum(self.loss_sum) / self.loss_count).item()  # syncs: the timing is honest
                    aux = (self.plan.sum(self.aux_sum) / self.loss_count).item()
                    dt = time.perf_counter() - tic
                    self.train_time += dt
                    log_time += dt
                    log_tokens += t.tokens_per_step
                    record = {"step": step, "tokens": self.tokens, "loss": loss}
                    if self.has_aux:
                        record["aux_loss"] = aux
                    record.update(self._lrs())
                    record["grad_norm"], record["value_grad_norm"] = (float(n) for n in norms)
                    record["tokens_per_s"] = log_tokens / max(log_time, 1e-9)
                    self.recent_losses.append(loss)
                    self.loss_sum.zero_()
                    self.aux_sum.zero_()
                    self.loss_count = 0
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                    log_time, log_tokens = 0.0, 0
                else:
                    dt = time.perf_counter() - tic
                    self.train_time += dt
                    log_time += dt
                    log_tokens += t.tokens_per_step
                if evaluate:
                    record = record or {"step": step, "tokens": self.tokens}
                    record.update({f"eval/{k}": v for k, v in self._eval(t.eval_limit).items()})
                elapsed = self.elapsed + time.perf_counter() - session_start
                if record:
                    record["elapsed"] = elapsed
                    self._write(record)
                if save:
                    self._save(elapsed, self.train_time)
                bar.update(1)
            if self.final_eval is None and self.evaluate is not False:
                # after the last checkpoint: a failed or killed final evaluation loses no training
                self.final_eval = self._eval(None)
                elapsed = self.elapsed + time.perf_counter() - session_start
                record = {"step": self.step, "tokens": self.tokens}
                record.update({f"eval/{k}": v for k, v in self.final_eval.items()})
                self._write({**record, "elapsed": elapsed})
                self._save(elapsed, self.train_time)  # a crash before result.json will not redo the evaluation
        except KeyboardInterrupt:
            where = f"step {self.saved_step}" if self.saved_step else "the start: no checkpoint was written yet"
            raise TrainingInterrupted(
                f"interrupted at step {self.step} of {t.steps}; rerun the same command to resume exactly from {where}"
            ) from None
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            if self.tb is not None:
                self.tb.close()
        return self._finish(self.elapsed + time.perf_counter() - session_start)

    def _finish(self, elapsed: float) -> dict:
        from ..accounting import account

        t = self.t
        result = {
            "config": self.cfg.to_dict(),
            "steps": self.step,
            "tokens": self.tokens,
            "final_loss": sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None,
            "wall_time": elapsed,
            "train_time": self.train_time,
            "tokens_per_s": self.tokens / self.train_time if self.train_time > 0 else None,
            "eval": self.final_eval or {},
            "accounting": _to_builtin(account(self.model, t.seq_len)),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "resumes": self.resumes,
            "steps_history": self.steps_history,
        }
        if not self.main:
            return result
        text = strict_json(result, indent=2)
        atomic_write(self.out_dir / RESULT, lambda f: f.write(text.encode()))
        try:
            write_curves(self.out_dir / METRICS, self.out_dir / CURVES)
        except Exception as e:  # noqa: BLE001 (a plot must not cost a finished run)
            warnings.warn(f"{self.out_dir / CURVES} not written: {type(e).__name__}: {e}", stacklevel=2)
        return result
