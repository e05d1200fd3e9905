"""Readouts: what the store read, mapped back to the model width."""

from .engram_gate import EngramReadout
from .projected import ProjectedReadout

__all__ = ["EngramReadout", "ProjectedReadout"]
