"""Checkpoints: atomic writes, validated reads with clear errors, and the state exact resume needs.

A checkpoint is one ``torch.save``d dict (loadable with ``weights_only=True``: tensors and builtins only;
a zip archive, whose CRC-32s ``read_checkpoint`` verifies, so flipped bytes are refused):

    format, version     "memlayers-checkpoint", 1 (2: sharded)
    config              RunConfig.to_dict() of the run (vocab_size resolved)
    step, tokens        optimizer steps done, training tokens seen
    model               the (uncompiled) model's state_dict     } or, saved by many processes,
    optimizer           the optimizer's state_dict              } shards: ``sharded_checkpoint``'s
    rng                 torch CPU / CUDA, Python and NumPy RNG states
    usage               per memory layer, its UsageTracker's state (its buffers are not in state_dict)
    trainer             the loop's own state (metrics.jsonl byte offset, loss accumulators, elapsed time)

``load_checkpoint(path)`` rebuilds the model from the saved config and loads the weights and usage
statistics (from either kind of checkpoint, or from an exported .safetensors file): what ``memlayers eval
CHECKPOINT`` needs.
"""

import contextlib
import glob
import math
import os
import random
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from ..errors import RunError
from ..metrics import UsageTracker

FORMAT = "memlayers-checkpoint"
VERSION = 1
SHARDED_VERSION = 2  # a checkpoint.pt naming shards: what a memlayers before them cannot read
CHECKPOINT = "checkpoint.pt"
TMP_MARK = ".tmp."
REQUIRED = ("config", "step", "tokens", "rng", "usage", "trainer")
WHOLE, SHARDED = ("model", "optimizer"), ("shards",)  # the tensors in the file, or in a sharded checkpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, not ours, or missing fields."""


class ConfigMismatchError(ValueError):
    """The run directory holds a run of another config than the one requested."""


# ----------------------------------------------------------------------------------------------
# atomic files


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one, never a mix.

    ``write(f)`` fills a temporary file ``.NAME.tmp.PID`` in the same directory (same filesystem, so the
    rename is atomic), which is flushed and fsynced, then ``os.replace``d onto ``path``; the directory is
    fsynced so the rename survives a power loss. On any error the temporary file is removed and ``path``
    is untouched; a failed write (full disk, read-only file system, no permission) raises ``OSError``
    naming the file and the cause.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # e.g. a read-only file system: keep the real error visible
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or _torch_write_failed(e):
            raise write_error(path, e) from None
        raise
    fsync_dir(path.parent)


def _torch_write_failed(e: BaseException) -> bool:
    """torch.save's own report of a failed write (a full disk): "[enforce fail at inline_container.cc:...]
    . unexpected pos 8801536 vs 8801424" or "... PytorchStreamWriter failed writing file ..."."""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "failed writing"))


@contextlib.contextmanager
def write_errors(path: str | os.PathLike):
    """Turn an OSError raised in the block into ``write_error(path, e)``."""
    try:
        yield
    except OSError as e:
        raise write_error(Path(path), e) from None


def write_error(path: Path, e: BaseException) -> OSError:
    """One OSError naming the file, the cause and the free space (torch.save's disk-full error names neither)."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = f"the write stopped short ({(str(e).splitlines() or [type(e).__name__])[0]})"
    try:
        reason += f"; {shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free there"
    except OSError:
        pass
    message = f"cannot write {path}: {reason}; free disk space or fix the permissions, then rerun"
    return OSError(e.errno, message) if isinstance(e, OSError) and e.errno else OSError(message)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_tmp(directory: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete the temporary files an ``atomic_write`` of one of ``names`` left when it was killed mid-way
    (``.NAME.tmp.PID``). Only those: other files, the user's included, are never touched. Call it only
    while holding the directory's lock (``memlayers.train.lock``), so no live writer owns them."""
    for name in names:
        for p in Path(directory).glob(f".{glob.escape(name)}{TMP_MARK}*"):
            if p.name[len(name) + 1 + len(TMP_MARK) :].isdigit() and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()


# ----------------------------------------------------------------------------------------------
# RNG and usage-tracker state


def rng_state() -> dict:
    """Every RNG the training loop may draw from (torch CPU and CUDA, Python, NumPy), as builtins/tensors."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def usage_trackers(model: nn.Module) -> dict[str, UsageTracker]:
    """{module name: UsageTracker} of every usage tracker in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, UsageTracker)}


def usage_state(model: nn.Module) -> dict[str, dict]:
    """The state of every UsageTracker (not in ``state_dict``), so resumed usage statistics equal
    uninterrupted ones."""
    return {name: t.tracker_state() for name, t in usage_trackers(model).items()}


def load_usage_state(model: nn.Module, states: dict[str, dict]) -> None:
    trackers = usage_trackers(model)
    if set(trackers) != set(states):
        raise CheckpointError(
            f"usage trackers in the checkpoint {sorted(states)} do not match the model's {sorted(trackers)}"
        )
    for name, t in trackers.items():
        t.load_tracker_state(states[name])


# ----------------------------------------------------------------------------------------------
# save / read / load


class NonFiniteError(RunError):
    """Training produced NaN or infinite numbers (a diverged run)."""


def nonfinite(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict/list that hold a NaN or an infinity."""
    if torch.is_tensor(tree):
        return [prefix] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in nonfinite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(tree, (list, tuple)):
        return [n for i, v in enumerate(tree) for n in nonfinite(v, f"{prefix}.{i}" if prefix else str(i))]
    if isinstance(tree, float) and not math.isfinite(tree):
        return [prefix]
    return []


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically ``torch.save`` ``state`` (the fields listed in the module docstring) to ``path``.

    Refuses (``NonFiniteError``, the file untouched) a state whose model or optimizer holds a NaN or an
    infinity: a diverged run never replaces a good checkpoint.
    """
    missing = [k for k in REQUIRED if k not in state] + _missing_tensors(state)
    if missing:
        raise ValueError(f"save_checkpoint: state lacks {missing}")
    bad = nonfinite({k: state[k] for k in WHOLE if k in state})
    if bad:
        raise NonFiniteError(
            f"{path}: not saved, {len(bad)} tensor(s) hold NaN or inf (e.g. {', '.join(bad[:3])}); "
            "the previous checkpoint is kept"
        )
    payload = {"format": FORMAT, "version": SHARDED_VERSION if "shards" in state else VERSION, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}; pass a checkpoint file or a run directory holding {CHECKPOINT} "
            "(one is written every train.ckpt_every steps and at the end of `memlayers train`)"
        )
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint dict (on CPU). Raises FileNotFoundError or CheckpointError."""
    path = resolve_checkpoint_path(path)
    damaged = (
        "the file is truncated, corrupt, or not a memlayers checkpoint. Delete or move it to restart the run "
        "from scratch, or restore a good copy"
    )
    try:
        with zipfile.ZipFile(path) as archive:  # torch.load does not check the archive's CRC-32s: check them first
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); {damaged}") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (checksum mismatch in {bad}); {damaged}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no second full read
    except Exception as e:  # noqa: BLE001 (torch.load raises many types for a damaged file)
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"{damaged}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a memlayers checkpoint (no format={FORMAT!r} marker)")
    if ckpt.get("version") not in (VERSION, SHARDED_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')!r}, this memlayers reads versions {VERSION} and "
            f"{SHARDED_VERSION}; use the memlayers version that wrote it"
        )
    missing = [k for k in REQUIRED if k not in ckpt] + _missing_tensors(ckpt)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; it is incomplete, restart the run")
    if "shards" in ckpt:
        ckpt["shards"]["path"] = str(path.parent / ckpt["shards"]["dir"])
    return ckpt


def _missing_tensors(state: dict) -> list[str]:
    """The fields of the tensors' layout that ``state`` lacks: whole (model, optimizer) or sharded (shards)."""
    layout = SHARDED if "shards" in state else WHOLE
    return [k for k in layout if k not in state]


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Rebuild a trained model: ``(RunConfig, model, extra)``.

    path: a checkpoint file, a run directory (``out_dir/checkpoint.pt``, whole or sharded) or a .safetensors
    file written by ``export_safetensors``. The model is built from the saved config, gets the saved weights
    and usage statistics, and is returned on ``device`` in eval mode. ``extra`` holds the rest of the
    checkpoint (step, tokens; from a one-file checkpoint also the optimizer, rng and trainer state; from a
    sharded one all but the optimizer, whose state is in the shards).
    """
    from ..model import Transformer
    from .config import RunConfig

    if str(path).endswith(".safetensors"):
        from .export import read_safetensors

        return read_safetensors(path, device=device)
    ckpt = read_checkpoint(path)
    try:
        cfg = RunConfig.from_dict(ckpt["config"], source=f"{path} (saved config)")
    except ValueError as e:
        raise CheckpointError(f"{path}: the saved config is not valid for this memlayers version: {e}") from None
    model = Transformer(cfg.model)
    try:
        if "shards" in ckpt:
            from ..distributed.plan import OneProcess
            from .sharded_checkpoint import load_sharded

            load_sharded(ckpt, model, None, OneProcess())
        else:
            model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model built from the saved config: {e}") from None
    model.to(device).eval()
    load_usage_state(model, ckpt["usage"])
    extra = {k: v for k, v in ckpt.items() if k not in ("config", "model", "shards")}
    return cfg, model, extra
