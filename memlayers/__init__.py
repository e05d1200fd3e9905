"""memlayers: trainable sparse key-value memory layers for PyTorch.

    import memlayers
    layer = memlayers.MemoryLayer.from_preset("memory_plus", dim=512, n_keys=256)
    y = layer(x)                      # x (..., 512) -> (..., 512)
    print(layer.usage.summary())      # coverage, KL to uniform, Gini, dead sub-keys, ...
"""

from .memory import (
    KINDS,
    PRESETS,
    LayerConfig,
    MemoryConfig,
    MemoryLayer,
    ProductKeys,
    ValueTable,
    preset,
    register_kind,
    register_preset,
)
from .metrics import UsageTracker
from .ops import embedding_bag, product_key_topk
from .optim import build_optimizer, clip_grad_norms, param_groups

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "LayerConfig",
    "PRESETS",
    "MemoryConfig",
    "MemoryLayer",
    "ProductKeys",
    "UsageTracker",
    "ValueTable",
    "build_optimizer",
    "clip_grad_norms",
    "embedding_bag",
    "param_groups",
    "preset",
    "product_key_topk",
    "register_kind",
    "register_preset",
]
