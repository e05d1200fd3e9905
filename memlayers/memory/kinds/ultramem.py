"""UltraMem v1 ("Ultra-Sparse Memory Network", Huang et al., ICLR 2025, arXiv 2411.12364).

Tucker product keys with a rank-1 pre-filter and multi-core scoring (``TuckerProductKeys``), no softmax,
an implicitly expanded value table (``ImplicitValueExpansion``), half-width values and an output
projection (``ProjectedReadout``), a value lr decaying from 10x to 1x. The skip-layer placement is the
model's (``MemorySpec.skip``).

Preset "ultramem": the paper's r = 2, C = 2, E = 4, 2 heads, 1024² virtual slots, key_dim dim/2. The
official V1-227M config reads knn = 80 slots per head (knum 808, kdim 192, vdim 384); the preset keeps
Memory's k = 32 so the product-key presets read alike; pass ``topk=80`` for the official count.
"""

import math
from dataclasses import dataclass, replace

from ..addressing.tucker import TuckerProductKeys
from ..config import KeyedConfig, even
from ..readouts import ProjectedReadout
from ..registry import register_kind, register_preset
from ..stores.ive import ImplicitValueExpansion


@register_kind
@dataclass(frozen=True)
class UltraMemConfig(KeyedConfig):
    """An UltraMem layer (see ``KeyedConfig`` and ``LayerConfig`` for the shared fields).

    n_keys: n sub-keys per side; n² virtual slots, n²/expansion physical value rows.
    rank: r of the Tucker keys and cores. cores: C score cores (multi-core scoring; C | value_dim).
    expansion: E virtual blocks per physical row (implicit value expansion).
    prefilter: m rows and columns kept by the rank-1 filter (None: topk; in [topk, n_keys]).
    svd_every: training forwards between refreshes of the filter. aux_weight, aux_tau: the Tucker core
    penalty (0 disables it). value_lr_start, value_lr_decay_frac: the value lr starts at value_lr_start
    times its peak and falls linearly to 1x over that fraction of training (1: constant).
    n_layers: depth of the host model, for the value init (``in_model`` fills it; None counts as 1).
    seed: of the virtual-slot permutation.
    Defaults differing from ``KeyedConfig``: score_fn "identity" (no softmax), query_norm "layernorm"
    (qk LayerNorm; the only one supported), query_bias False (as the official code), value_dim
    dim/2 rounded down to a multiple of cores ("halve v_dim, add an output projection").
    """

    kind = "ultramem"

    query_bias: bool = False
    query_norm: str = "layernorm"
    score_fn: str = "identity"
    rank: int = 2
    cores: int = 2
    expansion: int = 4
    prefilter: int | None = None
    svd_every: int = 1
    aux_weight: float = 0.001
    aux_tau: float = 0.15
    value_lr_start: float = 10.0
    value_lr_decay_frac: float = 1.0
    n_layers: int | None = None
    seed: int = 0

    def derive(self) -> None:
        if self.value_dim is None and self.cores >= 1:
            self.set("value_dim", max(self.cores, self.dim // 2 - (self.dim // 2) % self.cores))
        super().derive()

    def validate(self) -> None:
        super().validate()
        if self.query_norm != "layernorm":
            self.fail(
                "query_norm",
                f"must be 'layernorm', got {self.query_norm!r}",
                "UltraMem normalises queries and keys with LayerNorm built in",
            )
        if self.qk_norm:
            self.fail("qk_norm", "is not supported", "leave it False: UltraMem's qk LayerNorm is built in")
        for name in ("key_param", "key_init", "key_restart", "balance_loss"):
            default = KeyedConfig.__dataclass_fields__[name].default
            if getattr(self, name) != default:
                self.fail(name, "is an option of plain product keys, not of Tucker keys", f"leave it {default!r}")
        if self.score_dtype != "full":
            self.fail("score_dtype", "is not supported", "leave it 'full': Tucker scoring runs in full precision")
        for name in ("rank", "cores", "expansion", "svd_every"):
            if getattr(self, name) < 1:
                self.fail(
                    name,
                    f"must be >= 1, got {getattr(self, name)}",
                    f"use e.g. {type(self).__dataclass_fields__[name].default}",
                )
        if self.num_slots % self.expansion:
            self.fail(
                "expansion",
                f"n_keys**2={self.num_slots} is not divisible by expansion={self.expansion}",
                "pick n_keys a multiple of sqrt(expansion) (e.g. even n_keys for expansion 4)",
            )
        if self.value_dim % self.cores:
            self.fail(
                "value_dim", f"{self.value_dim} is not divisible by cores={self.cores}", "use a multiple of cores"
            )
        if self.prefilter is not None and not self.topk <= self.prefilter <= self.n_keys:
            self.fail(
                "prefilter",
                f"must be in [topk={self.topk}, n_keys={self.n_keys}], got {self.prefilter}",
                "use None for topk",
            )
        if self.aux_weight < 0:
            self.fail(
                "aux_weight", f"must be >= 0, got {self.aux_weight}", "use 0.001, or 0 to disable the core penalty"
            )
        if self.aux_tau < 0:
            self.fail("aux_tau", f"must be >= 0, got {self.aux_tau}", "use e.g. 0.15")
        if not self.value_lr_start > 0:
            self.fail(
                "value_lr_start", f"must be > 0, got {self.value_lr_start}", "use 10.0, or 1.0 for a constant value lr"
            )
        if not 0 < self.value_lr_decay_frac <= 1:
            self.fail(
                "value_lr_decay_frac",
                f"must be in (0, 1], got {self.value_lr_decay_frac}",
                "use 1.0 (decay over all of training)",
            )
        if self.n_layers is not None and self.n_layers < 1:
            self.fail("n_layers", f"must be >= 1 or None, got {self.n_layers}", "use None (the model fills it)")
        if self.seed < 0:
            self.fail("seed", f"must be >= 0, got {self.seed}", "use e.g. 0")

    @property
    def num_values(self) -> int:
        """Physical value rows, n²/E."""
        return self.num_slots // self.expansion

    @property
    def value_init_std(self) -> float:
        """The paper's value init sqrt(E / (2·k·H·L)) (k = topk, H = heads, L = n_layers or 1): with the IVE
        projections' init the memory output starts with variance 1/(2L)."""
        return math.sqrt(self.expansion / (2 * self.topk * self.heads * (self.n_layers or 1)))

    @property
    def lr_decay(self) -> tuple[float, float] | None:
        return None if self.value_lr_start == 1 else (self.value_lr_start, self.value_lr_decay_frac)

    def in_model(self, n_layers: int, vocab_size: int | None) -> "UltraMemConfig":
        return self if self.n_layers is not None else replace(self, n_layers=n_layers)

    def make_addressing(self) -> TuckerProductKeys:
        c = self
        return TuckerProductKeys(
            c.dim, c.n_keys, c.heads, c.topk, c.key_dim,
            rank=c.rank, cores=c.cores, prefilter=c.prefilter, svd_every=c.svd_every, score_fn=c.score_fn,
            query_per_rank=False, query_bias=c.query_bias, aux_weight=c.aux_weight, aux_tau=c.aux_tau,
            query_dropout=c.query_dropout,
        )  # fmt: skip

    def make_pool(self, rows: int | None = None) -> ImplicitValueExpansion:
        """``rows`` virtual slots (None: n²), i.e. ceil(rows / E) physical rows (a ring-shared pool's row
        count need not be a multiple of E)."""
        c = self
        return ImplicitValueExpansion(
            -(-(rows or c.num_slots) // c.expansion), c.value_dim, c.expansion, out_dim=c.value_dim, cores=c.cores,
            sparse_grad=c.sparse_values, seed=c.seed, init_std=c.value_init_std, lr_decay=c.lr_decay,
        )  # fmt: skip

    def make_readout(self) -> ProjectedReadout:
        return ProjectedReadout(self.dim, self.value_dim)

    def pool_signature(self) -> dict:
        return {
            **super().pool_signature(),
            "value_dim": self.value_dim,
            "expansion": self.expansion,
            "cores": self.cores,
        }


register_preset(
    "ultramem",
    UltraMemConfig,
    lambda dim: dict(n_keys=1024, heads=2, topk=32, key_dim=even(dim // 2), rank=2, cores=2, expansion=4),
    "Huang et al. 2025: Tucker rank-2 keys with rank-1 pre-filter, 2 cores, 1024^2 virtual slots (x4 implicit "
    "expansion), 2 heads x k=32, no softmax, value_dim dim/2 + projection, value lr 10x -> 1x",
)
