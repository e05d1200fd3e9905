"""UltraMemV2 (Huang et al., arXiv 2508.18756): UltraMem with PEER-style values, in every block.

Changes from UltraMem v1 (``ultramem``): one query per Tucker rank; PEER-style pre-values instead of implicit
expansion, ``o = Wᵀ Vᵀ((P x) ⊗ ŝ)``: slot i's weight ŝ_i is multiplied by ``U[i]·(P x)`` (no activation)
before its value row V[i] is summed, P is the layer's own pre-value projection (dim -> pre_dim) and W the
value projection (``ProjectedReadout``); no Tucker core penalty (the paper finds it unnecessary); a
constant value lr (the paper finds 1x beats a 4x -> 1x decay late in training).

Placement and sharing are the model's: memory in every block beside the FFN, the tables U and V shared
by all blocks in a ring or in blocks, e.g.
``MemorySpec(layers="all", preset="ultramem_v2", pool="values", share="ring:0.5", mode="beside")``.
"""

from dataclasses import dataclass

from ..addressing.tucker import TuckerProductKeys
from ..config import even
from ..parts import ValueStore
from ..registry import register_kind, register_preset
from ..stores.peer_experts import PEERExperts
from ..stores.projected_input import ProjectedInput
from .ultramem import UltraMemConfig


@register_kind
@dataclass(frozen=True)
class UltraMemV2Config(UltraMemConfig):
    """An UltraMemV2 layer: the fields of ``UltraMemConfig`` (expansion and cores fixed at 1) and

    pre_dim: width d_p of the pre-values U and of P x; None = value_dim / 3 (the paper's d_p : d_v = 1 : 3).
    Defaults differing from UltraMem v1: aux_weight 0 (no core penalty), value_lr_start 1 (constant value
    lr), value_dim = dim / 2. The value rows start at v1's init sqrt(1 / (2·k·H·L)); the paper's own
    init (its eq. 26) is not reproduced.
    """

    kind = "ultramem_v2"

    expansion: int = 1
    cores: int = 1
    aux_weight: float = 0.0
    value_lr_start: float = 1.0
    pre_dim: int | None = None

    def derive(self) -> None:
        super().derive()
        if self.pre_dim is None:
            self.set("pre_dim", max(1, self.value_dim // 3))

    def validate(self) -> None:
        for name in ("expansion", "cores"):
            if getattr(self, name) != 1:
                self.fail(
                    name,
                    f"must be 1, got {getattr(self, name)}",
                    "UltraMemV2 has PEER-style values: use the ultramem preset for it",
                )
        super().validate()
        if self.pre_dim < 1:
            self.fail("pre_dim", f"must be >= 1, got {self.pre_dim}", "use None for value_dim / 3")

    def make_addressing(self) -> TuckerProductKeys:
        c = self
        return TuckerProductKeys(
            c.dim, c.n_keys, c.heads, c.topk, c.key_dim,
            rank=c.rank, cores=1, prefilter=c.prefilter, svd_every=c.svd_every, score_fn=c.score_fn,
            query_per_rank=True, query_bias=c.query_bias, aux_weight=c.aux_weight, aux_tau=c.aux_tau,
            query_dropout=c.query_dropout,
        )  # fmt: skip

    def make_pool(self, rows: int | None = None) -> PEERExperts:
        """The shared tables: pre-values U (rows, pre_dim) and values V (rows, value_dim)."""
        c = self
        return PEERExperts(
            rows or c.num_slots, c.pre_dim, c.value_dim, "identity", c.sparse_values, c.value_init_std, c.lr_decay
        )

    def make_store(self, pool: ValueStore | None = None) -> ProjectedInput:
        """This layer's pre-value projection P in front of its own tables or the shared pool."""
        return ProjectedInput(self.make_pool() if pool is None else pool, self.dim, self.pre_dim, owned=pool is None)

    def pool_signature(self) -> dict:
        return {
            "num_slots": self.num_slots,
            "out_dim": self.value_dim,
            "sparse_grad": self.sparse_values,
            "in_dim": self.pre_dim,
            "activation": "identity",
        }


register_preset(
    "ultramem_v2",
    UltraMemV2Config,
    lambda dim: dict(n_keys=1024, heads=1, topk=32, key_dim=even(dim // 2), rank=2),
    "Huang et al. 2025 (v2): Tucker rank-2 keys, one query per rank, 1 head x k=32, PEER-style pre-values "
    "(d_p : d_v = 1 : 3, no activation), value_dim dim/2 + projection; place in every block, share the tables",
)
