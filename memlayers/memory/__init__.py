"""The composable memory core: addressing x value store x readout, a registry of kinds and presets.

    layer = MemoryLayer.from_preset("peer", dim=512, n_keys=256)
    layer = MemoryLayer(preset("memory_plus", 512))

Kinds register themselves when ``memlayers.memory.kinds`` is imported (it is, by this package).
"""

from . import kinds  # noqa: F401  (registers the shipped kinds and presets)
from .addressing import HashedNGrams, ProductKeys, TuckerProductKeys
from .config import KeyedConfig, LayerConfig
from .kinds.engram import EngramConfig
from .kinds.peer import PEERConfig
from .kinds.product_key import MemoryConfig
from .kinds.ultramem import UltraMemConfig
from .kinds.ultramem_v2 import UltraMemV2Config
from .layer import MemoryLayer
from .parts import ROLES, Addressing, MemoryPart, Readout, ValueStore
from .readouts import EngramReadout, ProjectedReadout
from .registry import KINDS, PRESETS, Preset, preset, register_kind, register_preset
from .stores import ConcatTable, ImplicitValueExpansion, PEERExperts, ProjectedInput, RingWindow, ValueTable

__all__ = [
    "KINDS",
    "PRESETS",
    "ROLES",
    "Addressing",
    "ConcatTable",
    "EngramConfig",
    "EngramReadout",
    "HashedNGrams",
    "ImplicitValueExpansion",
    "KeyedConfig",
    "LayerConfig",
    "MemoryConfig",
    "MemoryLayer",
    "MemoryPart",
    "PEERConfig",
    "PEERExperts",
    "Preset",
    "ProductKeys",
    "ProjectedInput",
    "ProjectedReadout",
    "Readout",
    "RingWindow",
    "TuckerProductKeys",
    "UltraMemConfig",
    "UltraMemV2Config",
    "ValueStore",
    "ValueTable",
    "preset",
    "register_kind",
    "register_preset",
]
