"""Product-key memory: PKM (Lample et al. 2019), Memory and Memory+ (Berges et al. 2024).

``y = sum_heads sum_topk w * V[index]`` over the exact top-k product keys, then ``W2 (y * silu(W1 x))``
when ``gated`` (Memory+), else a projection to ``dim`` if ``value_dim != dim``.
"""

from dataclasses import dataclass

from ..config import KeyedConfig, even
from ..readouts import ProjectedReadout
from ..registry import register_kind, register_preset
from ..stores.value_table import ValueTable


@register_kind
@dataclass(frozen=True)
class MemoryConfig(KeyedConfig):
    """A product-key memory layer (see ``KeyedConfig`` and ``LayerConfig`` for the shared fields).

    gated: Memory+ output ``W2 (y * silu(W1 x))``.
    """

    kind = "product_key"

    gated: bool = False

    def make_pool(self, rows: int | None = None) -> ValueTable:
        return ValueTable(rows or self.num_slots, self.value_dim, sparse_grad=self.sparse_values)

    def make_readout(self) -> ProjectedReadout:
        return ProjectedReadout(self.dim, self.value_dim, self.gated)


register_preset(
    "pkm",
    MemoryConfig,
    lambda dim: dict(n_keys=512, heads=4, topk=32, key_dim=min(256, even(dim)), query_norm="batchnorm"),
    "Lample et al. 2019: 512^2 slots, 4 heads x k=32, key_dim 256, query BatchNorm",
)
register_preset(
    "memory",
    MemoryConfig,
    lambda dim: dict(n_keys=1024, heads=4, topk=32, key_dim=even(dim // 2)),
    "Memory Layers at Scale, plain lookup: 1024^2 slots, 4 heads x k=32, key_dim dim/2, value_dim dim",
)
register_preset(
    "memory_plus",
    MemoryConfig,
    lambda dim: dict(n_keys=1024, heads=4, topk=32, key_dim=even(dim // 2), gated=True),
    "Memory+: the same lookup, gated (swilu) output; share one value pool across ~3 layers",
)
