"""A trained model as one safetensors file: ``export_safetensors(checkpoint, out)`` from any checkpoint (one
process's or a sharded one of many), ``read_safetensors(path)`` (or ``load_checkpoint(path)``) back in one.

The file holds the model's ``state_dict`` under its own keys (a tied weight once; the others named in the
metadata's "tied"), the usage statistics under ``usage/<tracker>/<buffer>``, and in its metadata the run's
config (JSON), step and tokens: ``safetensors.torch.load_file`` reads it without memlayers.
"""

import json
import os
from pathlib import Path

import torch
from torch import nn

from .._extras import require
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, load_usage_state, usage_state

FORMAT = "memlayers-model"
USAGE = "usage/"


def export_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the model of ``checkpoint`` (a run directory, a checkpoint file) to ``out`` (a .safetensors path),
    atomically. Refuses to replace an existing file unless ``force``. Returns ``out``."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the exported file's name must end in .safetensors")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another name, or pass --force (force=True) to replace it")
    cfg, model, extra = load_checkpoint(checkpoint)
    tensors, tied = _untied(model)
    usage = {}
    for tracker, state in usage_state(model).items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{USAGE}{tracker}/{name}"] = value.contiguous()
            else:
                usage.setdefault(tracker, {})[name] = value
    metadata = {
        "format": FORMAT,
        "config": json.dumps(cfg.to_dict()),
        "step": str(extra["step"]),
        "tokens": str(extra["tokens"]),
        "tied": json.dumps(tied),
        "usage": json.dumps(usage),
    }
    data = require("safetensors.torch", "train").save(tensors, metadata)
    atomic_write(out, lambda f: f.write(data))
    return out


def read_safetensors(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """``(RunConfig, model, {"step", "tokens"})`` from an exported file: the model on ``device``, in eval mode."""
    from ..model import Transformer
    from .config import RunConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {str(path)!r}")
    st = require("safetensors.torch", "train")
    try:
        tensors = st.load_file(path)
        with st.safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a damaged file)
        raise CheckpointError(
            f"{path}: cannot read it ({type(e).__name__}: {e}); it is truncated or not safetensors"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a memlayers model (no format={FORMAT!r} in its metadata); see `memlayers export`"
        )
    try:
        cfg = RunConfig.from_dict(json.loads(metadata["config"]), source=f"{path} (saved config)")
    except ValueError as e:
        raise CheckpointError(f"{path}: the saved config is not valid for this memlayers version: {e}") from None
    model = Transformer(cfg.model)
    weights = {k: v for k, v in tensors.items() if not k.startswith(USAGE)}
    for key, same in json.loads(metadata["tied"]).items():
        weights[key] = weights[same]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model built from the saved config: {e}") from None
    usage = {name: dict(state) for name, state in json.loads(metadata["usage"]).items()}
    for key, value in tensors.items():
        if key.startswith(USAGE):
            tracker, name = key[len(USAGE) :].rsplit("/", 1)
            usage.setdefault(tracker, {})[name] = value
    load_usage_state(model, usage)
    return cfg, model.to(device).eval(), {"step": int(metadata["step"]), "tokens": int(metadata["tokens"])}


def _untied(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state_dict with each tensor once (safetensors refuses shared ones), and {dropped key: kept key}."""
    tensors, tied, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = t.contiguous()
    return tensors, tied
