"""Training runs: configs (YAML + overrides), the loop, atomic checkpoints and exact resume.

    from memlayers.train import load_config, train, load_checkpoint
    cfg = load_config("run.yaml", ["train.steps=500", "model.dim=256"])
    result = train(cfg, "runs/a")                 # resumes runs/a if it holds a checkpoint of cfg
    cfg, model, extra = load_checkpoint("runs/a")  # the trained model, in eval mode
    export_safetensors("runs/a", "a.safetensors")  # the model as one file (load_checkpoint reads it too)
"""

from .checkpoint import (
    CheckpointError,
    ConfigMismatchError,
    atomic_write,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .config import RunConfig, TrainConfig, config_diff, load_config, save_config
from .export import export_safetensors
from .trainer import lr_multiplier, train

__all__ = [
    "CheckpointError",
    "ConfigMismatchError",
    "RunConfig",
    "TrainConfig",
    "atomic_write",
    "config_diff",
    "export_safetensors",
    "load_checkpoint",
    "load_config",
    "lr_multiplier",
    "read_checkpoint",
    "save_checkpoint",
    "save_config",
    "train",
]
