"""PEER (He 2024, "Mixture of A Million Experts", arXiv 2407.04153): product keys choose single-neuron experts.

``f(x) = sum_heads sum_{j in topk} g_j act(u_j · x) v_j`` over N = n_keys^2 experts, gates ``g`` the
softmax (or sigmoid) of each head's selected scores; then a projection to ``dim`` if ``value_dim != dim``.
"""

from dataclasses import dataclass

from ..config import KeyedConfig, even
from ..readouts import ProjectedReadout
from ..registry import register_kind, register_preset
from ..stores.peer_experts import ACTIVATIONS, PEERExperts


@register_kind
@dataclass(frozen=True)
class PEERConfig(KeyedConfig):
    """A PEER layer (see ``KeyedConfig`` and ``LayerConfig`` for the shared fields).

    activation: the experts' nonlinearity, "gelu" | "relu" | "silu" | "identity".
    value_dim: the experts' output width (default dim); the slots are ``PEERExperts`` rows.
    """

    kind = "peer"

    activation: str = "gelu"

    def validate(self) -> None:
        super().validate()
        if self.activation not in ACTIVATIONS:
            self.fail("activation", f"unknown {self.activation!r}", f"choose one of {tuple(ACTIVATIONS)}")

    def make_pool(self, rows: int | None = None) -> PEERExperts:
        return PEERExperts(rows or self.num_slots, self.dim, self.value_dim, self.activation, self.sparse_values)

    def make_readout(self) -> ProjectedReadout:
        return ProjectedReadout(self.dim, self.value_dim, gated=False)

    def pool_signature(self) -> dict:
        return {**super().pool_signature(), "in_dim": self.dim, "activation": self.activation}


register_preset(
    "peer",
    PEERConfig,
    lambda dim: {
        "n_keys": 1024,
        "heads": 8,
        "topk": 16,
        "key_dim": even(dim // 2),
        "query_norm": "batchnorm",
        "score_fn": "softmax",
    },
    "He 2024: 1024^2 single-neuron experts act(u.x) v, 8 heads x k=16, key_dim dim/2, query BatchNorm, softmax gates",
)
