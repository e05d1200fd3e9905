"""The memory kinds that ship with memlayers; importing a kind's module registers it and its presets."""

from . import engram, peer, product_key, ultramem, ultramem_v2

__all__ = ["engram", "peer", "product_key", "ultramem", "ultramem_v2"]
