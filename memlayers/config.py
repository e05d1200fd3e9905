"""MemoryConfig, the one description of a memory layer, and the papers' presets."""

import numbers
import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, fields, replace

from .norms import QUERY_NORMS
from .retrieval import SCORE_FNS

_KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
_ACCEPTED = {int: numbers.Integral, float: numbers.Real, str: str}


def type_problem(value, annotation) -> str | None:
    """Why ``value`` does not fit a field annotated ``annotation``, or None if it does.

    Checks ``bool``, ``int``, ``float``, ``str`` and their ``X | None``; other annotations pass. A bool
    is not an int (nor a float) here; an int is a float, and NumPy's numbers count as Python's.
    E.g. ``"must be an integer, got 16.5 (float)"``.
    """
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = typing.get_args(annotation) if union else (annotation,)
    optional = type(None) in allowed
    kinds = [t for t in allowed if t is not type(None)]
    if (value is None and optional) or len(kinds) != 1 or kinds[0] not in _KINDS:
        return None
    kind = kinds[0]
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, _ACCEPTED[kind]) and not isinstance(value, bool)
    if ok:
        return None
    return f"must be {_KINDS[kind]}{' or None' if optional else ''}, got {value!r} ({type(value).__name__})"


def check_field_types(obj) -> list[tuple[Field, str]]:
    """(field, problem) for every field of the dataclass instance ``obj`` whose value has the wrong type;
    fields of the right type that hold a NumPy number are set to the Python int or float."""
    hints = typing.get_type_hints(type(obj))
    found = [(f, type_problem(getattr(obj, f.name), hints[f.name])) for f in fields(obj)]
    for f, problem in found:
        value = getattr(obj, f.name)
        if not problem and isinstance(value, numbers.Number) and type(value) not in (bool, int, float):
            object.__setattr__(obj, f.name, int(value) if isinstance(value, numbers.Integral) else float(value))
    return [(f, problem) for f, problem in found if problem]


@dataclass(frozen=True)
class MemoryConfig:
    """Everything that defines a memory layer. ``None`` sizes are derived from ``dim``.

    dim: model width of the layer's input and output.
    n_keys: sub-keys per half, n; the memory has N = n*n slots.
    heads, topk: each token reads heads*topk slots.
    key_dim: full query/key width (split in two halves); default dim/2 (rounded to even).
    value_dim: width of a value row; default dim. If != dim, an output projection maps back.
    query_bias, query_norm ("none" | "layernorm" | "rmsnorm" | "batchnorm"), qk_norm, score_fn
    ("softmax" | "relu" | "identity"): see ``ProductKeys``.
    gated: Memory+ output ``W2 (y * silu(W1 x))``.
    input_dropout, query_dropout, value_dropout: dropout on x, on the query, on the read values.
    sparse_values: row-sparse value gradients (for the sparse optimizer path).
    track_usage, usage_window: keep a ``UsageTracker`` updated on every training forward.
    """

    dim: int
    n_keys: int = 1024
    heads: int = 4
    topk: int = 32
    key_dim: int | None = None
    value_dim: int | None = None
    query_bias: bool = True
    query_norm: str = "none"
    qk_norm: bool = False
    score_fn: str = "softmax"
    gated: bool = False
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0
    sparse_values: bool = False
    track_usage: bool = True
    usage_window: int = 100

    def __post_init__(self):
        def fail(name, problem, fix):
            raise ValueError(f"MemoryConfig.{name}: {problem}; {fix}")

        for f, problem in check_field_types(self):  # types first: the checks below compare and divide
            if f.default is MISSING:
                fail(f.name, problem, "pass the model width")
            fail(f.name, problem, "use None for the default" if f.default is None else f"use e.g. {f.default!r}")
        if self.dim < 1:
            fail("dim", f"must be >= 1, got {self.dim}", "pass the model width")
        if self.key_dim is None:
            object.__setattr__(self, "key_dim", max(2, self.dim // 2 - (self.dim // 2) % 2))
        if self.value_dim is None:
            object.__setattr__(self, "value_dim", self.dim)
        if self.n_keys < 1:
            fail("n_keys", f"must be >= 1, got {self.n_keys}", "N = n_keys**2 slots; use e.g. 256 or 1024")
        if self.heads < 1:
            fail("heads", f"must be >= 1, got {self.heads}", "use e.g. 4")
        if not 1 <= self.topk <= self.n_keys:
            fail("topk", f"must be in [1, n_keys={self.n_keys}], got {self.topk}", "lower topk or raise n_keys")
        if self.key_dim < 2 or self.key_dim % 2:
            fail("key_dim", f"must be even and >= 2 (split into two halves), got {self.key_dim}", "use an even width")
        if self.value_dim < 1:
            fail("value_dim", f"must be >= 1, got {self.value_dim}", "use e.g. dim")
        if self.query_norm not in QUERY_NORMS:
            fail("query_norm", f"unknown {self.query_norm!r}", f"choose one of {QUERY_NORMS}")
        if self.score_fn not in SCORE_FNS:
            fail("score_fn", f"unknown {self.score_fn!r}", f"choose one of {SCORE_FNS}")
        for name in ("input_dropout", "query_dropout", "value_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                fail(name, f"must be in [0, 1), got {p}", "use 0.0 to disable")
        if self.usage_window < 1:
            fail("usage_window", f"must be >= 1, got {self.usage_window}", "use e.g. 100 steps")

    @property
    def num_values(self) -> int:
        return self.n_keys**2

    def to_dict(self) -> dict:
        return asdict(self)


def _even(x: int) -> int:
    return max(2, x - x % 2)


# The papers' defaults, as functions of the model width.
PRESETS = {
    # Lample et al. 2019: 512^2 slots, 4 heads x k=32, key_dim 256, query BatchNorm.
    "pkm": lambda dim: dict(n_keys=512, heads=4, topk=32, key_dim=min(256, _even(dim)), query_norm="batchnorm"),
    # Memory Layers at Scale, plain lookup: 1024^2 slots, key_dim = dim/2, value_dim = dim.
    "memory": lambda dim: dict(n_keys=1024, heads=4, topk=32, key_dim=_even(dim // 2)),
    # Memory+: the same lookup with the gated (swilu) output; share one ValueTable across ~3 layers.
    "memory_plus": lambda dim: dict(n_keys=1024, heads=4, topk=32, key_dim=_even(dim // 2), gated=True),
}


def preset(name: str, dim: int, **overrides) -> MemoryConfig:
    """The named preset scaled to ``dim``, with any field overridden, e.g. ``preset("memory_plus", 512, n_keys=256)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown memory preset {name!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(MemoryConfig)} - {"dim"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown MemoryConfig field(s) {unknown}; valid fields: {sorted(known)}")
    return replace(MemoryConfig(dim=dim, **PRESETS[name](dim)), **overrides)
