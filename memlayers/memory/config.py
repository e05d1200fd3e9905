"""The base of every memory kind's config, and the fields of product-key addressed kinds."""

import numbers
import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, fields
from typing import ClassVar

from .addressing.product_keys import KEY_INITS, KEY_PARAMS, SCORE_DTYPES, SCORE_FNS, ProductKeys
from .norms import QUERY_NORMS
from .parts import Addressing, Readout, ValueStore

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


def even(x: int) -> int:
    """x rounded down to an even number, at least 2 (a query splits into two halves)."""
    return max(2, x - x % 2)


@dataclass(frozen=True)
class LayerConfig:
    """The fields every memory kind has, and how a kind builds its parts. ``None`` sizes derive from ``dim``.

    dim: model width of the layer's input and output.
    input_dropout, value_dropout: dropout on x and on what the store read.
    sparse_values: row-sparse gradients for the "values" tables (for the row-sparse optimizers).
    track_usage, usage_window: keep a ``UsageTracker`` updated on every training forward.

    A kind subclasses this (a frozen dataclass; ``kind`` names it in the registry) and implements
    ``make_addressing``, ``make_pool`` and ``make_readout`` (called in that order: the parts draw their
    init from the global RNG in that order). Validation errors read ``ClassName.field: problem; fix``.
    """

    kind: ClassVar[str] = ""
    ring_shareable: ClassVar[bool] = True  # can its pool be read through a RingWindow (slot ids offset)?

    dim: int
    input_dropout: float = 0.0
    value_dropout: float = 0.0
    sparse_values: bool = False
    track_usage: bool = True
    usage_window: int = 100

    def fail(self, name: str, problem: str, fix: str):
        raise ValueError(f"{type(self).__name__}.{name}: {problem}; {fix}")

    def __post_init__(self):
        for f, problem in check_field_types(self):  # types first: the checks compare and divide
            if f.default is MISSING:
                self.fail(f.name, problem, "pass the model width")
            self.fail(f.name, problem, "use None for the default" if f.default is None else f"use e.g. {f.default!r}")
        if self.dim < 1:
            self.fail("dim", f"must be >= 1, got {self.dim}", "pass the model width")
        self.derive()
        self.validate()

    def derive(self) -> None:
        """Fill the ``None`` fields that derive from others (``object.__setattr__``: the config is frozen)."""

    def validate(self) -> None:
        """Check the fields; subclasses call ``super().validate()`` first."""
        for name in ("input_dropout", "value_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                self.fail(name, f"must be in [0, 1), got {p}", "use 0.0 to disable")
        if self.usage_window < 1:
            self.fail("usage_window", f"must be >= 1, got {self.usage_window}", "use e.g. 100 steps")

    def set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    # ---- building the parts

    def make_addressing(self) -> Addressing:
        raise NotImplementedError

    def make_pool(self, rows: int | None = None) -> ValueStore:
        """A new store: the layer's own, or a pool several layers share (``rows``: its slots, None = this
        layer's ``num_slots``; larger for windowed sharing)."""
        raise NotImplementedError

    def make_store(self, pool: ValueStore | None = None) -> ValueStore:
        """This layer's store: a new one, or what it reads of the shared ``pool`` (by default the pool itself)."""
        return self.make_pool() if pool is None else pool

    def make_readout(self) -> Readout:
        raise NotImplementedError

    @property
    def num_slots(self) -> int:
        """How many slots the addressing chooses from (the store's rows a layer reads)."""
        raise NotImplementedError

    def pool_signature(self) -> dict:
        """What a store shared with this layer must have: compared with ``ValueStore.signature()``."""
        raise NotImplementedError

    def in_model(self, n_layers: int, vocab_size: int | None) -> "LayerConfig":
        """This config adapted to a host model of ``n_layers`` blocks and ``vocab_size`` tokens (e.g. an
        init that depends on depth); by default unchanged."""
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KeyedConfig(LayerConfig):
    """Fields of kinds addressed by product keys (PKM, Memory, Memory+, PEER, UltraMem).

    n_keys: sub-keys per half, n; the memory has N = n*n slots.
    heads, topk: each token reads heads*topk slots.
    key_dim: full query/key width (split in two halves); default dim/2 (rounded to even).
    value_dim: width of a value row; default dim.
    query_bias, query_norm ("none" | "layernorm" | "rmsnorm" | "batchnorm"), qk_norm, score_fn
    ("softmax" | "sigmoid" | "relu" | "identity"), query_dropout, score_dtype ("full" | "bfloat16": exact
    top-k of the bf16 scores, on tensor cores): see ``ProductKeys``.
    Remedies for sub-keys that stop being chosen, off by default (see ``ProductKeys``): query_norm "whiten" |
    "layernorm_half" | "rmsnorm_half"; key_param ("learned" | "simvq" | "frozen"), key_init ("uniform" |
    "kmeans"), key_restart (threshold c in [0, 1), 0 = off) every restart_every steps, balance_loss (weight,
    0 = off) at temperature balance_tau.
    """

    n_keys: int = 1024
    heads: int = 4
    topk: int = 32
    key_dim: int | None = None
    value_dim: int | None = None
    query_bias: bool = True
    query_norm: str = "none"
    qk_norm: bool = False
    score_fn: str = "softmax"
    query_dropout: float = 0.0
    score_dtype: str = "full"
    key_param: str = "learned"
    key_init: str = "uniform"
    key_restart: float = 0.0
    restart_every: int = 100
    balance_loss: float = 0.0
    balance_tau: float = 1.0

    def derive(self) -> None:
        if self.key_dim is None:
            self.set("key_dim", even(self.dim // 2))
        if self.value_dim is None:
            self.set("value_dim", self.dim)

    def validate(self) -> None:
        super().validate()
        if self.n_keys < 1:
            self.fail("n_keys", f"must be >= 1, got {self.n_keys}", "N = n_keys**2 slots; use e.g. 256 or 1024")
        if self.heads < 1:
            self.fail("heads", f"must be >= 1, got {self.heads}", "use e.g. 4")
        if not 1 <= self.topk <= self.n_keys:
            self.fail("topk", f"must be in [1, n_keys={self.n_keys}], got {self.topk}", "lower topk or raise n_keys")
        if self.key_dim < 2 or self.key_dim % 2:
            self.fail(
                "key_dim", f"must be even and >= 2 (split into two halves), got {self.key_dim}", "use an even width"
            )
        if self.value_dim < 1:
            self.fail("value_dim", f"must be >= 1, got {self.value_dim}", "use e.g. dim")
        if self.query_norm not in QUERY_NORMS:
            self.fail("query_norm", f"unknown {self.query_norm!r}", f"choose one of {QUERY_NORMS}")
        if self.score_fn not in SCORE_FNS:
            self.fail("score_fn", f"unknown {self.score_fn!r}", f"choose one of {SCORE_FNS}")
        if self.score_dtype not in SCORE_DTYPES:
            self.fail("score_dtype", f"unknown {self.score_dtype!r}", f"choose one of {SCORE_DTYPES}")
        if not 0.0 <= self.query_dropout < 1.0:
            self.fail("query_dropout", f"must be in [0, 1), got {self.query_dropout}", "use 0.0 to disable")
        if self.key_param not in KEY_PARAMS:
            self.fail("key_param", f"unknown {self.key_param!r}", f"choose one of {KEY_PARAMS}")
        if self.key_init not in KEY_INITS:
            self.fail("key_init", f"unknown {self.key_init!r}", f"choose one of {KEY_INITS}")
        if not 0 <= self.key_restart < 1:
            self.fail("key_restart", f"must be in [0, 1), got {self.key_restart}", "use 0.0 (off) or e.g. 0.1")
        if self.key_restart > 0 and self.key_param != "learned":
            self.fail("key_restart", f"moves learned sub-keys, not {self.key_param!r} ones", "use key_param='learned'")
        if self.restart_every < 1:
            self.fail("restart_every", f"must be >= 1, got {self.restart_every}", "use e.g. 100 steps")
        if not self.balance_loss >= 0:
            self.fail("balance_loss", f"must be >= 0, got {self.balance_loss}", "use 0.0 (off) or e.g. 0.01")
        if not self.balance_tau > 0:
            self.fail("balance_tau", f"must be > 0, got {self.balance_tau}", "use e.g. 1.0")

    @property
    def num_slots(self) -> int:
        return self.n_keys**2

    @property
    def num_values(self) -> int:
        return self.num_slots

    def product_keys(self) -> ProductKeys:
        c = self
        return ProductKeys(
            c.dim,
            c.n_keys,
            c.heads,
            c.topk,
            c.key_dim,
            c.query_bias,
            c.query_norm,
            c.qk_norm,
            c.score_fn,
            c.query_dropout,
            c.score_dtype,
            key_param=c.key_param,
            key_init=c.key_init,
            key_restart=c.key_restart,
            restart_every=c.restart_every,
            balance_loss=c.balance_loss,
            balance_tau=c.balance_tau,
        )

    def make_addressing(self) -> Addressing:
        return self.product_keys()

    def pool_signature(self) -> dict:
        return {"num_slots": self.num_slots, "out_dim": self.value_dim, "sparse_grad": self.sparse_values}
