"""The registry of memory kinds and presets: ``preset("peer", 512, n_keys=256)`` -> a config.

A kind is a ``LayerConfig`` subclass registered with ``@register_kind``; a preset is a name, a kind and
the papers' defaults as a function of the model width, registered with ``register_preset``. Both
usually live in one file under ``memlayers/memory/kinds/`` (see the README, "Write your own memory").
"""

from collections.abc import Callable
from dataclasses import dataclass, fields

from .config import LayerConfig

KINDS: dict[str, type[LayerConfig]] = {}
PRESETS: dict[str, "Preset"] = {}


@dataclass(frozen=True)
class Preset:
    """name: what users write; config: the kind's config class; defaults(dim) -> field values; doc: one line."""

    name: str
    config: type[LayerConfig]
    defaults: Callable[[int], dict]
    doc: str = ""

    def fields(self) -> set[str]:
        """The fields a user may override (all but ``dim``)."""
        return {f.name for f in fields(self.config)} - {"dim"}


def register_kind(cls: type[LayerConfig]) -> type[LayerConfig]:
    """Class decorator: make a config class (with a unique ``kind``) known by its kind name."""
    if not cls.kind:
        raise ValueError(f"register_kind: {cls.__name__}.kind must name the kind")
    if KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"register_kind: kind {cls.kind!r} is already registered by {KINDS[cls.kind].__name__}")
    KINDS[cls.kind] = cls
    return cls


def register_preset(name: str, config: type[LayerConfig], defaults: Callable[[int], dict], doc: str = "") -> Preset:
    """Make ``preset(name, dim)`` build ``config(dim=dim, **defaults(dim))``."""
    if name in PRESETS and PRESETS[name].config is not config:
        raise ValueError(f"register_preset: preset {name!r} is already registered for {PRESETS[name].config.__name__}")
    PRESETS[name] = Preset(name, config, defaults, doc)
    return PRESETS[name]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown memory preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def preset(name: str, dim: int, **overrides) -> LayerConfig:
    """The named preset scaled to ``dim``, with any field overridden:
    ``preset("memory_plus", 512, n_keys=256)``."""
    p = get_preset(name)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"preset {name!r}: dim must be an integer >= 1 (the model width), got {dim!r}")
    unknown = sorted(set(overrides) - p.fields())
    if unknown:
        raise ValueError(
            f"unknown {p.config.__name__} field(s) {unknown} for preset {name!r}; valid fields: {sorted(p.fields())}"
        )
    return p.config(dim=dim, **{**p.defaults(dim), **overrides})  # one pass: derived fields see the overrides
