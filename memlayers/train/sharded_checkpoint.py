"""Sharded checkpoints: a run on many processes saves with torch.distributed.checkpoint (DCP), each process
writing its own part, and resumes on any number of processes and memory-group sizes (or loads in one).

On disk, in the run directory::

    checkpoint.pt                    the checkpoint (``memlayers.train.checkpoint``'s format) without "model"
                                     and "optimizer", with "shards": {"dir", "files", "param_groups"}
    checkpoints/step_000000100/      the DCP checkpoint it names: .metadata and every process's .distcp files

The DCP checkpoint holds the run's tensors by name, each as the whole tensor (DCP stores every process's
part of it): ``model.<state_dict key>`` and ``optim.<parameter name>.<state key>`` (e.g.
``optim.blocks.0.memory.store.weight.exp_avg``); the optimizers' param_groups (hyperparameters) are in
checkpoint.pt. A save writes a new directory, records the size and CRC-32 of each of its files, then
replaces checkpoint.pt atomically and removes the older directories: a crash at any point leaves the
previous checkpoint whole. A load checks the recorded sizes and checksums first (each process a share of the
files), so a damaged or missing file is refused with one line.
"""

import re
import shutil
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..distributed.launch import agree, all_objects
from ..optim.combined import optimizer_parts
from .checkpoint import CHECKPOINT, CheckpointError, NonFiniteError, fsync_dir, nonfinite, save_checkpoint

SHARDS = "checkpoints"
_SHARD_DIR = re.compile(r"step_\d{9}(\.\d+)?")


def named_state(model: nn.Module, optimizer, plan) -> dict:
    """The run's tensors by name in their global view (``plan.global_view``): ``model.<key>`` (views of the
    live weights: loading into them loads the model) and, with ``optimizer``, ``optim.<param>.<state>``
    (non-tensor state, e.g. a step count, as it is)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {f"model.{k}": plan.global_view(params.get(k), t) for k, t in model.state_dict().items()}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for opt in optimizer_parts(optimizer):
            for p in (p for g in opt.param_groups for p in g["params"]):
                for key, value in opt.state.get(p, {}).items():
                    view = plan.global_view(p, value) if torch.is_tensor(value) and value.dim() > 0 else value
                    state[f"optim.{names[id(p)]}.{key}"] = view
    return state


def save_sharded(
    out_dir: Path, meta: dict | None, model: nn.Module, optimizer, plan, reuse: dict | None = None
) -> dict:
    """Save a run's state from every process (collective). ``meta``: on the main process, the checkpoint's
    fields but "model" and "optimizer" (``save_checkpoint``'s); ignored elsewhere. ``reuse``: the "shards" of
    the last checkpoint when no tensor changed since (the same step): only checkpoint.pt is rewritten.
    Returns the new checkpoint's "shards".

    Raises ``NonFiniteError`` on every process, writing nothing, when a tensor holds NaN or inf; ``OSError``
    naming the cause when a write fails (the previous checkpoint is kept in both cases)."""
    shards = reuse or _write_shards(out_dir, meta["step"] if meta else None, model, optimizer, plan)

    def commit():
        fsync_dir(out_dir / shards["dir"])  # the new files' names durable before checkpoint.pt names them
        fsync_dir(out_dir / SHARDS)
        save_checkpoint(
            out_dir / CHECKPOINT, {**meta, "shards": {k: shards[k] for k in ("dir", "files", "param_groups")}}
        )
        remove_stale_shards(out_dir, keep=shards["dir"])

    agree(commit)
    return shards


def _write_shards(out_dir: Path, step: int | None, model: nn.Module, optimizer, plan) -> dict:
    """Write the tensors into a new shard directory; its "shards" entry (collective)."""
    state = named_state(model, optimizer, plan)
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in state.items() if torch.is_tensor(v)}
    found = all_objects(nonfinite(local)[:3])
    if any(found):
        names = [n for f in found for n in f]
        raise NonFiniteError(
            f"{out_dir / CHECKPOINT}: not saved, tensors hold NaN or inf (e.g. {', '.join(names[:3])}); the previous "
            "checkpoint is kept"
        )
    name = agree(lambda: _new_shard_dir(out_dir, step))
    directory = out_dir / name
    try:
        dcp.save(state, checkpoint_id=directory)
    except dcp.api.CheckpointException as e:
        raise OSError(
            f"cannot write the sharded checkpoint {directory}: {_first_failure(e)}; free disk space or fix the "
            "permissions, then rerun (the previous checkpoint is kept)"
        ) from None
    param_groups = [opt.state_dict()["param_groups"] for opt in optimizer_parts(optimizer)]
    return {"dir": name, "files": _manifest(directory, plan), "param_groups": param_groups}


def load_sharded(ckpt: dict, model: nn.Module, optimizer, plan) -> None:
    """Load a sharded checkpoint (``read_checkpoint``'s dict) into ``model`` and, if given, ``optimizer``,
    laid out by ``plan`` (any number of processes, any memory groups; collective over a plan's processes, and
    alone with ``OneProcess``, also under torchrun). Raises CheckpointError on
    damaged or missing files and on names or shapes that do not fit."""
    shards = ckpt["shards"]
    directory = Path(shards["path"])
    _verify(directory, shards["files"], plan)
    try:
        saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 (a damaged .metadata raises many types)
        raise CheckpointError(f"{directory}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    state = named_state(model, None, plan)
    wanted = {k for k in saved if k.startswith("model.")}
    if set(state) != wanted:
        differ = sorted(set(state) ^ wanted)
        raise CheckpointError(
            f"{directory}: its weights do not fit the model ({len(differ)} name(s) differ, e.g. {differ[:3]})"
        )
    params = {n: p for n, p in model.named_parameters()}
    if optimizer is not None:
        for key, meta in saved.items():
            if key.startswith("optim."):
                pname = key[len("optim.") :].rsplit(".", 1)[0]
                if pname not in params:
                    raise CheckpointError(f"{directory}: optimizer state of {pname!r}, which the model lacks")
                tensor = isinstance(meta, TensorStorageMetadata)
                state[key] = plan.empty(params[pname], meta.size, meta.properties.dtype) if tensor else None
    for key, meta in saved.items():
        if key.startswith("model.") and tuple(meta.size) != tuple(state[key].shape):
            raise CheckpointError(
                f"{directory}: {key[len('model.') :]} is {tuple(meta.size)} there, {tuple(state[key].shape)} in the model"
            )
    with warnings.catch_warnings():  # alone, DCP warns that it loads in one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=directory, no_dist=plan.world == 1)  # one process's plan: alone
        except dcp.api.CheckpointException as e:
            raise CheckpointError(f"{directory}: cannot read the sharded checkpoint ({_first_failure(e)})") from None
    if optimizer is None:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    groups = shards["param_groups"]
    if len(groups) != len(optimizer_parts(optimizer)):
        raise CheckpointError(
            f"{directory}: {len(groups)} optimizer(s) saved, the run has {len(optimizer_parts(optimizer))}"
        )
    for opt, param_groups in zip(optimizer_parts(optimizer), groups):
        own = [p for g in opt.param_groups for p in g["params"]]
        prefixes = [f"optim.{names[id(p)]}." for p in own]
        per_param = {
            i: {k[len(prefix) :]: plan.local(own[i], v) for k, v in state.items() if k.startswith(prefix)}
            for i, prefix in enumerate(prefixes)
        }
        opt.load_state_dict({"state": {i: s for i, s in per_param.items() if s}, "param_groups": param_groups})


def remove_stale_shards(out_dir: Path, keep: str | None = None) -> None:
    """Remove the shard directories in ``out_dir/checkpoints`` but ``keep`` (memlayers' own names only: other
    files there are left alone). Call it only after checkpoint.pt names ``keep`` (or is a whole checkpoint)."""
    for p in (out_dir / SHARDS).glob("step_*"):
        if p.is_dir() and _SHARD_DIR.fullmatch(p.name) and f"{SHARDS}/{p.name}" != keep:
            shutil.rmtree(p, ignore_errors=True)


def _new_shard_dir(out_dir: Path, step: int) -> str:
    """A name for a new shard directory (relative to out_dir) that nothing uses yet."""
    base = f"{SHARDS}/step_{step:09d}"
    name, n = base, 0
    while (out_dir / name).exists():
        n += 1
        name = f"{base}.{n}"
    return name


def _first_failure(e: BaseException) -> str:
    """One line from DCP's CheckpointException: its first rank's exception."""
    failure = next(iter(getattr(e, "failures", {}).values()), e)
    failure = failure[0] if isinstance(failure, tuple) else failure
    lines = str(failure).strip().splitlines()
    return f"{type(failure).__name__}: {lines[-1] if lines else ''}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _manifest(directory: Path, plan) -> dict[str, list[int]]:
    """{file name: [bytes, CRC-32]} of every file of a saved DCP checkpoint, each process checksumming a share."""
    names = agree(lambda: sorted(p.name for p in directory.iterdir() if p.is_file()))
    mine, failed = {}, []
    for n in names[plan.rank :: plan.world]:
        try:
            mine[n] = [(directory / n).stat().st_size, _crc32(directory / n)]
        except OSError as e:  # reported by every process below, none left waiting
            failed.append(f"{n}: {e.strerror or e}")
    parts = all_objects((mine, failed))
    failed = [f for _, f in parts for f in f]
    if failed:
        raise OSError(f"cannot read back the sharded checkpoint {directory} ({'; '.join(failed[:3])}); the previous "
                      "checkpoint is kept")  # fmt: skip
    return {n: v for m, _ in parts for n, v in m.items()}


def _verify(directory: Path, files: dict[str, list[int]], plan) -> None:
    """Raise CheckpointError on every process when a recorded file is missing, of another size or checksum."""
    problems = []
    for n in sorted(files)[plan.rank :: plan.world]:
        path, (size, crc) = directory / n, files[n]
        try:
            if not path.is_file():
                problems.append(f"{n} is missing")
            elif path.stat().st_size != size:
                problems.append(f"{n} has {path.stat().st_size} bytes, {size} were written")
            elif _crc32(path) != crc:
                problems.append(f"{n} fails its checksum")
        except OSError as e:  # reported by every process below, none left waiting
            problems.append(f"{n} cannot be read ({e.strerror or e})")
    if plan.world > 1:
        problems = [p for part in all_objects(problems) for p in part]
    if problems:
        raise CheckpointError(
            f"{directory}: damaged sharded checkpoint ({'; '.join(problems[:3])}); restore the files (if a training "
            "run is writing this directory, its next checkpoint replaced them: read it again)"
        )
