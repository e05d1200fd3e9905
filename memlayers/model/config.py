"""ModelConfig (with its MoESpec and MemorySpecs) and the layer-placement mini-language.

Every config is a plain ``@dataclass`` with defaults, typed so OmegaConf structured configs accept it.
Construction validates (``__post_init__`` calls ``validate()``); call ``validate()`` again after editing
fields in place (``Transformer`` does). Errors are ``ValueError``s naming the field and the fix.
"""

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..memory.config import LayerConfig
from ..memory.registry import PRESETS, preset

MEMORY_MODES = ("replace", "beside")
_RESERVED = set(dir(nn.Module())) | {"names"}  # attributes of the model's Pools container


def parse_share(text: str) -> tuple[str, float]:
    """How a spec's layers read their pool: "all" -> ("all", 1); "ring:F" -> ("ring", F) with 0 < F <= 1;
    "block:G" -> ("block", G) with G >= 1. Raises ``ValueError`` for anything else."""
    s = str(text).strip().lower()
    if s == "all":
        return "all", 1
    kind, _, arg = s.partition(":")
    try:
        value = float(arg) if kind == "ring" else int(arg)
    except ValueError:
        value = None
    if kind == "ring" and value is not None and 0 < value <= 1:
        return "ring", value
    if kind == "block" and value is not None and value >= 1:
        return "block", value
    raise ValueError(
        f"share {text!r}: expected 'all' (every layer reads the same rows), 'ring:F' (layer j reads the window "
        "starting at j*F*N of a ring of L*F*N rows, 0 < F <= 1) or 'block:G' (groups of G layers share a pool)"
    )


def parse_placement(text: str, n_layers: int) -> tuple[int, ...]:
    """Which blocks (0-based) a placement string selects, sorted.

    ``""`` -> none; ``"all"`` -> every block; ``"1,3"`` -> explicit ids; ``"center:K:S"`` -> K blocks
    with stride S centred on the stack: the first is ``n_layers//2 - ((K-1)*S)//2`` (the paper's 3 memory
    layers in a 24-layer model: ``parse_placement("center:3:8", 24) == (4, 12, 20)``), moved down just
    enough to fit when that would overhang the last block (``"center:4:1"`` on 4 layers -> (0, 1, 2, 3)).

    Raises ``ValueError`` for garbage, out-of-range or duplicate ids, and centred runs that do not fit.
    """
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"parse_placement: n_layers must be an int >= 1, got {n_layers!r}")
    if not isinstance(text, str):
        text = str(text)  # e.g. an int from a YAML file: 3 -> "3"
    s = text.strip().lower()
    if s == "":
        return ()
    if s == "all":
        return tuple(range(n_layers))
    if s.startswith("center"):
        parts = [p.strip() for p in s.split(":")]
        if len(parts) != 3 or parts[0] != "center" or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(
                f"placement {text!r}: expected 'center:K:S' with integers K >= 1 and S >= 1, e.g. 'center:3:8'"
            )
        k, stride = int(parts[1]), int(parts[2])
        if k < 1 or stride < 1:
            raise ValueError(f"placement {text!r}: K and S must be >= 1, e.g. 'center:3:8'")
        span = (k - 1) * stride + 1
        if span > n_layers:
            raise ValueError(
                f"placement {text!r}: {k} layers with stride {stride} span {span} blocks, more than the {n_layers} "
                "the model has; lower K or S"
            )
        first = min(n_layers // 2 - ((k - 1) * stride) // 2, n_layers - span)  # shifted down only if it overhangs
        last = first + (k - 1) * stride
        return tuple(range(first, last + 1, stride))
    ids = []
    for part in s.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            raise ValueError(
                f"placement {text!r}: {part!r} is not a layer id; use '' (none), 'all', comma-separated 0-based ids "
                "like '1,3', or 'center:K:S'"
            )
        ids.append(int(part))
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"placement {text!r}: layer id(s) {bad} out of range; ids are 0-based, in [0, {n_layers - 1}]")
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise ValueError(f"placement {text!r}: layer id(s) {dups} given more than once; list each layer once")
    return tuple(sorted(ids))


def _fail(name: str, problem: str, fix: str):
    raise ValueError(f"{name}: {problem}; {fix}")


def _build(cls, value, name: str):
    """A spec from a dict (e.g. ``ModelConfig(moe=dict(layers="1"))``), errors prefixed with the field name."""
    if not isinstance(value, dict):
        return value
    try:
        return cls(**value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None


@dataclass
class MoESpec:
    """Mixture-of-experts FFNs in the blocks ``layers`` selects (a placement string; "" = no MoE).

    experts: E SwiGLU experts per MoE layer; topk: experts per token (token-choice routing: softmax over
    the E router logits, keep the top k, renormalise their k weights to sum to 1). Dropless: there is no
    capacity limit, every token is processed by all k of its experts (no token is ever dropped, so the
    output does not depend on the rest of the batch). hidden: per-expert SwiGLU hidden width (None =
    the dense ``ffn_hidden``). aux_weight: weight of the Switch/Mixtral load-balancing loss
    ``E * sum_e f_e * P_e`` (1.0 when routing is uniform) added to ``ModelOutput.aux_loss``.
    """

    layers: str = ""
    experts: int = 8
    topk: int = 2
    hidden: int | None = None
    aux_weight: float = 0.01

    def __post_init__(self):
        self.validate()

    def validate(self, name: str = "MoESpec") -> None:
        if self.experts < 1:
            _fail(f"{name}.experts", f"must be >= 1, got {self.experts}", "use e.g. 8")
        if not 1 <= self.topk <= self.experts:
            _fail(f"{name}.topk", f"must be in [1, experts={self.experts}], got {self.topk}", "use e.g. 2")
        if self.hidden is not None and self.hidden < 1:
            _fail(f"{name}.hidden", f"must be >= 1 or None, got {self.hidden}", "use None for the dense ffn_hidden")
        if not self.aux_weight >= 0:
            _fail(f"{name}.aux_weight", f"must be >= 0, got {self.aux_weight}", "use e.g. 0.01 (0 disables it)")


@dataclass
class MemorySpec:
    """Memory layers in the blocks ``layers`` selects (a placement string).

    preset: a memory preset name (``memlayers.PRESETS``: pkm, memory, memory_plus, peer, ultramem,
    ultramem_v2, engram, or one you registered), scaled to the model width; options: overrides of that
    preset's config fields, e.g. ``{"n_keys": 128, "topk": 8}``.
    pool: specs/layers with the same pool name share ONE value store, owned by the model
    (``Transformer.pools[name]``; the Memory+ shared pool); they must agree on its sizes. None = every
    layer has its own store.
    share: how this spec's layers read their pool: "all" (the same rows), "ring:F" (UltraMemV2's ring:
    layer j of the spec reads N rows starting at row j*F*N of a pool of max(N, L*F*N) rows, wrapping
    around; each row is read by about 1/F layers) or "block:G" (consecutive groups of G layers each
    share their own pool, named ``pool_0``, ``pool_1``, ...). All specs naming one pool use one share.
    mode: "replace" (the memory replaces the block's FFN) or "beside" (the memory's output is added
    to the FFN's). skip: a memory written at block b reads the normalised FFN input of block b - skip
    (UltraMem's skip-layer: the lookup can start blocks before its result is needed); 0 = its own block.
    """

    layers: str = ""
    preset: str = "memory_plus"
    pool: str | None = None
    mode: str = "replace"
    options: dict[str, Any] = field(default_factory=dict)
    skip: int = 0
    share: str = "all"

    def __post_init__(self):
        self.validate()

    def memory_config(
        self, dim: int, name: str = "MemorySpec.options", n_layers: int | None = None, vocab_size: int | None = None
    ) -> LayerConfig:
        """The config of this spec's layers in a model of width ``dim`` (adapted to its depth and vocabulary
        when given: see ``LayerConfig.in_model``)."""
        try:
            config = preset(self.preset, dim, **dict(self.options))
            return config if n_layers is None else config.in_model(n_layers, vocab_size)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: {e}") from None

    def validate(self, name: str = "MemorySpec") -> None:
        if self.preset not in PRESETS:
            _fail(f"{name}.preset", f"unknown {self.preset!r}", f"choose one of {sorted(PRESETS)}")
        if self.mode not in MEMORY_MODES:
            _fail(f"{name}.mode", f"unknown {self.mode!r}", f"choose one of {MEMORY_MODES}")
        if self.pool is not None and (
            not isinstance(self.pool, str) or not self.pool.isidentifier() or self.pool in _RESERVED
        ):
            _fail(
                f"{name}.pool",
                f"must be None or a name like 'values' (a Python identifier, not an nn.Module attribute), "
                f"got {self.pool!r}",
                "e.g. 'shared'",
            )
        if not isinstance(self.skip, int) or isinstance(self.skip, bool) or self.skip < 0:
            _fail(f"{name}.skip", f"must be an integer >= 0, got {self.skip!r}", "use 0 to read the layer's own block")
        try:
            parse_share(self.share)
        except ValueError as e:
            _fail(f"{name}.share", str(e), "use 'all' unless you want windowed sharing")
        if parse_share(self.share)[0] != "all" and self.pool is None:
            _fail(f"{name}.share", f"{self.share!r} needs a pool", "set pool to a name, or share to 'all'")
        if "dim" in self.options:
            _fail(f"{name}.options", "'dim' cannot be set", "a memory layer always has the model's width")
        known = PRESETS[self.preset].fields()
        unknown = sorted(set(self.options) - known)
        if unknown:
            config = PRESETS[self.preset].config.__name__
            _fail(
                f"{name}.options",
                f"unknown {config} field(s) {unknown} for preset {self.preset!r}",
                f"valid fields: {sorted(known)}",
            )


@dataclass
class ModelConfig:
    """A small Llama-style decoder, optionally with MoE FFNs and memory layers.

    vocab_size: None = take it from the dataset (``Transformer`` requires it set).
    ffn_hidden: SwiGLU hidden width; None = 8/3*dim rounded up to a multiple of ``multiple_of``
    (``hidden`` gives the resolved value). Attention has ``n_heads`` heads of ``dim // n_heads`` (even, for
    RoPE) and no biases. ``tie_embeddings``: the lm head reuses the token embedding. ``init_std``: N(0, std)
    for every weight, residual output projections std/sqrt(2*n_layers); memory layers keep their own init.
    moe: MoE placement and shape; memories: memory layer specs. A block may hold MoE or a memory, not both,
    and at most one memory.
    """

    vocab_size: int | None = None
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int | None = None
    multiple_of: int = 16
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    moe: MoESpec = field(default_factory=MoESpec)
    memories: list[MemorySpec] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = _build(MoESpec, self.moe, "moe")
        self.memories = [_build(MemorySpec, m, f"memories[{i}]") for i, m in enumerate(self.memories)]
        self.validate()

    @property
    def hidden(self) -> int:
        """The dense SwiGLU hidden width: ``ffn_hidden`` or 8/3*dim rounded up to ``multiple_of``."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        h = int(8 * self.dim / 3)
        return self.multiple_of * -(-h // self.multiple_of)

    @property
    def expert_hidden(self) -> int:
        return self.moe.hidden if self.moe.hidden is not None else self.hidden

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return parse_placement(self.moe.layers, self.n_layers)

    def memory_placement(self) -> dict[int, tuple[int, MemorySpec]]:
        """block index -> (index into ``memories``, its spec)."""
        out = {}
        for s, spec in enumerate(self.memories):
            for layer in self._placement(spec.layers, f"memories[{s}].layers"):
                if layer in out:
                    _fail(
                        f"memories[{s}].layers",
                        f"layer {layer} already has a memory from memories[{out[layer][0]}]",
                        "give every layer at most one memory spec",
                    )
                out[layer] = (s, spec)
        return out

    def _placement(self, text: str, name: str) -> tuple[int, ...]:
        try:
            return parse_placement(text, self.n_layers)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    def validate(self) -> None:
        """Check every field and the cross-field rules; raise ``ValueError`` naming the field and the fix."""
        if self.vocab_size is not None and self.vocab_size < 1:
            _fail("vocab_size", f"must be >= 1 or None, got {self.vocab_size}", "use the tokenizer's vocab size")
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                _fail(name, f"must be >= 1, got {getattr(self, name)}", "use a positive integer")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            _fail(
                "n_heads",
                f"dim={self.dim} must split into n_heads={self.n_heads} heads of even width (RoPE rotates pairs)",
                "pick n_heads dividing dim with dim // n_heads even",
            )
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            _fail("ffn_hidden", f"must be >= 1 or None, got {self.ffn_hidden}", "use None for 8/3*dim")
        if not self.rope_theta > 0:
            _fail("rope_theta", f"must be > 0, got {self.rope_theta}", "use e.g. 10000.0")
        if not self.norm_eps > 0:
            _fail("norm_eps", f"must be > 0, got {self.norm_eps}", "use e.g. 1e-5")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", f"must be in [0, 1), got {self.dropout}", "use 0.0 to disable")
        if not self.init_std > 0:
            _fail("init_std", f"must be > 0, got {self.init_std}", "use e.g. 0.02")
        self.moe.validate("moe")
        moe_layers = self._placement(self.moe.layers, "moe.layers")
        for s, spec in enumerate(self.memories):
            spec.validate(f"memories[{s}]")
        placed = self.memory_placement()
        both = sorted(set(moe_layers) & set(placed))
        if both:
            _fail(
                "moe.layers",
                f"layer(s) {both} have both MoE and a memory layer",
                "a block holds an MoE FFN or a memory, not both: move one of them",
            )
        pools: dict[str, tuple[int, dict]] = {}
        generated: set[str] = set()  # the pools a "block:G" spec makes: NAME_0, NAME_1, ...
        for s, spec in enumerate(self.memories):
            mc = spec.memory_config(self.dim, f"memories[{s}].options", self.n_layers, self.vocab_size)
            layers = parse_placement(spec.layers, self.n_layers)
            early = [b for b in layers if b - spec.skip < 0]
            if early:
                _fail(
                    f"memories[{s}].skip",
                    f"layer(s) {early} would read block(s) {[b - spec.skip for b in early]}, before the first block",
                    f"place them at blocks >= {spec.skip} or lower skip",
                )
            if spec.pool is None or not layers:
                continue
            how = parse_share(spec.share)[0]
            if how == "ring" and not mc.ring_shareable:
                _fail(
                    f"memories[{s}].share", f"{mc.kind!r} memories cannot read a ring window", "use 'all' or 'block:G'"
                )
            if how != "all" and spec.pool in pools:
                _fail(
                    f"memories[{s}].pool",
                    f"pool {spec.pool!r} is also used by memories[{pools[spec.pool][0]}], but a {spec.share!r} pool "
                    "places its layers by their order in one spec",
                    "put all the layers reading it in one spec (e.g. layers: 'all'), or give them separate pools",
                )
            sig = {**mc.pool_signature(), "share": parse_share(spec.share)}
            if spec.pool in pools and pools[spec.pool][1] != sig:
                other, theirs = pools[spec.pool]
                differ = ", ".join(f"{k}={theirs.get(k)!r} vs {v!r}" for k, v in sig.items() if theirs.get(k) != v)
                _fail(
                    f"memories[{s}].pool",
                    f"pool {spec.pool!r} is shared with memories[{other}], which differs ({differ})",
                    "layers sharing one pool must agree on its sizes: give them the same options or separate pools",
                )
            pools.setdefault(spec.pool, (s, sig))
            if how == "block":
                generated |= {f"{spec.pool}_{g}" for g in range(-(-len(layers) // parse_share(spec.share)[1]))}
        clash = sorted(generated & set(pools))
        if clash:
            _fail("memories.pool", f"pool name(s) {clash} are also the names of a 'block:G' pool's parts", "rename it")
