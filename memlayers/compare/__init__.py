"""``memlayers compare``: dense vs MoE vs Memory vs Memory+ at matched FLOPs/token, on synthetic facts."""

from .presets import PRESETS, CompareConfig, get_preset
from .runner import run_compare

__all__ = ["PRESETS", "CompareConfig", "get_preset", "run_compare"]
