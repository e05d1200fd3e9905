"""The decoder used by training and the comparisons: dense, MoE and memory-layer variants of one Transformer."""

from .config import MEMORY_MODES, MemorySpec, ModelConfig, MoESpec, parse_placement
from .moe import MoE
from .transformer import ModelOutput, Transformer

__all__ = [
    "MEMORY_MODES",
    "MemorySpec",
    "MoE",
    "MoESpec",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "parse_placement",
]
