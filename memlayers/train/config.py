"""TrainConfig and RunConfig (model + data + train), loaded from YAML plus dotlist overrides.

    cfg = load_config("run.yaml", ["train.lr=3e-4", "model.memories=[{layers: 'center:1:1', options: {n_keys: 64}}]"])
    cfg.to_dict()                          # plain dict (JSON/YAML safe)
    RunConfig.from_dict(cfg.to_dict())     # == cfg
    save_config(cfg, "out/config.yaml")    # resolved YAML, written atomically

Loading goes through OmegaConf structured configs, so every key and type is checked against the
dataclasses: an unknown key or a value of the wrong type is a ``ValueError`` naming the key, where
it came from, and the valid keys (or the expected type).
"""

import dataclasses
import difflib
import importlib.resources
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._extras import missing_extra

try:
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError
except ModuleNotFoundError as e:  # `pip install memlayers` is the layer library only: name the extra to install
    raise (missing_extra(e, "train") or e) from None

from ..data import DataConfig
from ..model import MemorySpec, ModelConfig
from ..optim import VALUE_OPTIMIZERS

DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    """How to train. One optimizer step ("step") sees ``batch_size * grad_accum`` sequences of ``seq_len`` tokens.

    steps: optimizer steps.
    batch_size: sequences per micro-batch; a step accumulates ``grad_accum`` micro-batches, which are the
        consecutive slices of the step's ``batch_size * grad_accum`` sequences (so accumulation only changes
        how a step's batch is split, never which sequences it holds).
    lr: peak learning rate of the base groups; the values group runs at ``value_lr_ratio * lr``
        (``value_lr_ratio`` null: the value optimizer's default, ``memlayers.optim.VALUE_LR_RATIOS``).
    min_lr_ratio, warmup: linear warmup over ``warmup`` steps to the peak, then cosine decay to
        ``min_lr_ratio`` x peak at the last step, applied to every parameter group (each keeps its own peak).
    weight_decay, beta1, beta2: AdamW (no decay on values, sub-keys, biases and gains).
    value_optimizer: "adamw", or a row-sparse one: "sparse_adam", "sparse_adagrad" or "sparse_sgd" (these
        need memories built with ``options: {sparse_values: true}``; see ``memlayers.build_optimizer``).
    fused_values: apply the row-sparse value optimizer inside the backward (``memlayers.optim.FusedRowOptimizer``:
        no value gradients, no separate pass over the tables); needs a sparse ``value_optimizer`` and
        ``value_clip: null`` (a gradient that is never formed cannot be clipped by its norm).
    clip, value_clip: max gradient norm of the non-value parameters / of the value tables (None: no clipping).
    eval_every: steps between periodic evaluations (0: only the final one); eval_limit: probes per format in
        the periodic ones (the final evaluation has no limit).
    log_every: steps between JSONL log lines; ckpt_every: steps between checkpoints (the last step always
        writes one).
    seed: seeds Python, NumPy and torch (model init, dropout).
    device: "auto" (CUDA if available, else CPU) or a torch device string.
    dtype: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "float32", or "bfloat16" (autocast).
    compile: torch.compile the model for training (checkpoints hold the uncompiled module's weights).
    threads: torch.set_num_threads for the run (restored afterwards); None leaves it alone.
    tensorboard: also write TensorBoard scalars to out_dir/tb (needs the tensorboard package).
    progress: show a tqdm progress bar.
    init_from: a run directory or checkpoint whose model weights initialise this run (a model of the same
        config); optimizer state, step, schedule and usage statistics start fresh. None: random init.
    """

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    value_lr_ratio: float | None = None
    value_optimizer: str = "adamw"
    fused_values: bool = False
    clip: float | None = 1.0
    value_clip: float | None = 1.0
    eval_every: int = 200
    eval_limit: int | None = 512
    log_every: int = 10
    ckpt_every: int = 200
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    threads: int | None = None
    tensorboard: bool = False
    progress: bool = True
    init_from: str | None = None

    def __post_init__(self):
        def fail(name, problem, fix):
            raise ValueError(f"train.{name}: {problem}; {fix}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}", "use a positive integer")
        for name in ("warmup", "eval_every"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}", "use 0 to disable")
        if not (math.isfinite(self.lr) and self.lr > 0):
            fail("lr", f"must be a finite number > 0, got {self.lr}", "use e.g. 1e-3")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}", "use e.g. 0.1")
        if self.value_lr_ratio is not None and not (math.isfinite(self.value_lr_ratio) and self.value_lr_ratio > 0):
            fail(
                "value_lr_ratio",
                f"must be > 0 or null, got {self.value_lr_ratio}",
                "use null for the optimizer's default",
            )
        if not self.weight_decay >= 0:
            fail("weight_decay", f"must be >= 0, got {self.weight_decay}", "use e.g. 0.1")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, f"must be in [0, 1), got {getattr(self, name)}", "use e.g. 0.9 / 0.95")
        for name in ("clip", "value_clip"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                fail(name, f"must be > 0 or null, got {getattr(self, name)}", "use null to disable clipping")
        if self.eval_limit is not None and self.eval_limit < 1:
            fail("eval_limit", f"must be >= 1 or null, got {self.eval_limit}", "use null for every probe")
        if self.value_optimizer not in VALUE_OPTIMIZERS:
            fail("value_optimizer", f"unknown {self.value_optimizer!r}", f"choose one of {VALUE_OPTIMIZERS}")
        if self.fused_values and self.value_optimizer == "adamw":
            fail(
                "fused_values",
                "needs a row-wise value optimizer",
                "set train.value_optimizer=sparse_adam (or sparse_adagrad, sparse_sgd)",
            )
        if self.fused_values and self.value_clip is not None:
            fail(
                "value_clip",
                f"is {self.value_clip}, but with train.fused_values=true the values are updated inside the backward, "
                "before their gradient's norm is known",
                "set train.value_clip=null (or train.fused_values=false)",
            )
        if self.dtype not in DTYPES:
            fail("dtype", f"unknown {self.dtype!r}", f"choose one of {DTYPES}")
        if self.threads is not None and self.threads < 1:
            fail("threads", f"must be >= 1 or null, got {self.threads}", "use null to keep torch's default")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


SHARDINGS = ("column", "row")


@dataclass
class ParallelConfig:
    """How a run launched with ``torchrun`` spreads over its processes (see ``memlayers.distributed.parallelize``).

    Every process reads ``train.batch_size / world size`` sequences of each micro-batch (``train.batch_size``
    stays the global batch: the same config trains the same model on 1 or N processes), the dense parameters
    are sharded over all processes (FSDP2), and value tables over memory groups of ``memory`` processes.

    memory: processes per memory group (1: value tables whole on every process); must divide the world size.
    sharding: "column" (each process holds d/M of every row) or "row" (N/M rows each) for the value tables.
    """

    memory: int = 1
    sharding: str = "column"

    def __post_init__(self):
        if self.memory < 1:
            raise ValueError(f"parallel.memory: must be >= 1, got {self.memory}; use 1 for whole tables")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"parallel.sharding: unknown {self.sharding!r}; choose one of {SHARDINGS}")


@dataclass
class RunConfig:
    """Everything a training run needs: ``model`` (ModelConfig), ``data`` (DataConfig), ``train`` (TrainConfig),
    ``parallel`` (ParallelConfig: only read under torchrun)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if (
            self.parallel.sharding == "column"
            and self.parallel.memory > 1
            and self.train.value_optimizer == "sparse_adagrad"
        ):
            raise ValueError(
                "parallel.sharding=column cannot shard row-wise Adagrad's per-row state (train.value_optimizer="
                "sparse_adagrad); use parallel.sharding=row, or another value optimizer"
            )
        if self.train.fused_values:
            pass  # the fused update reads the tables through the bag's backward: sparse_values does not matter
        elif self.train.value_optimizer != "adamw":
            dense = [i for i, m in enumerate(self.model.memories) if not dict(m.options).get("sparse_values", False)]
            if dense:
                raise ValueError(
                    f"train.value_optimizer={self.train.value_optimizer} needs row-sparse value gradients: set "
                    + ", ".join(f"model.memories[{i}].options.sparse_values=true" for i in dense)
                )
        else:
            sparse = [i for i, m in enumerate(self.model.memories) if dict(m.options).get("sparse_values", False)]
            if sparse:
                raise ValueError(
                    "train.value_optimizer=adamw cannot take the row-sparse value gradients of "
                    + ", ".join(f"model.memories[{i}].options.sparse_values=true" for i in sparse)
                    + "; set train.value_optimizer=sparse_adam (or sparse_adagrad, sparse_sgd), or sparse_values=false"
                )

    def to_dict(self) -> dict:
        """A plain nested dict of builtins (dataclasses and tuples turned into dicts and lists)."""
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "dict") -> "RunConfig":
        """Inverse of ``to_dict``; missing keys take their defaults, unknown keys / bad types -> ValueError."""
        return _build([(source, OmegaConf.create(data))])

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), base: RunConfig | None = None
) -> RunConfig:
    """``base`` (default: the defaults), updated by the YAML file at ``path`` (if given), then by ``overrides``.

    path: a YAML file, or ``memlayers:NAME`` for an example config shipped with memlayers (``packaged_configs()``:
    facts_memory_plus, text_bytes).
    overrides: dotlist items ``key=value`` with YAML values, e.g. ``train.lr=3e-4``, ``train.clip=null``,
    ``model.memories=[{layers: "1,3", pool: shared, options: {n_keys: 128}}]`` (a list replaces the whole list).
    Raises FileNotFoundError for a missing file and ValueError for unreadable YAML, unknown keys, values of the
    wrong type and out-of-range values, each naming the key and the fix.
    """
    layers = [] if base is None else [("base config", OmegaConf.structured(base))]
    if path is not None:
        path = _config_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found; pass the path of a YAML run config")
        loaded = _load_yaml(path)
        if not isinstance(loaded, DictConfig):
            raise ValueError(f"{path}: a run config must be a YAML mapping with keys model/data/train, got a list")
        layers.append((str(path), loaded))
    updates = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. train.lr=3e-4")
        key, text = (part.strip() for part in item.split("=", 1))
        if not key:
            raise ValueError(f"override {item!r} has no key before '='; use e.g. train.lr=3e-4")
        try:
            # OmegaConf's YAML parsing of the value; interpolations (${train.steps}) resolve later, in the whole config
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)["value"]
        except OmegaConfBaseException as e:
            raise ValueError(
                f"override {item!r} could not be parsed ({_first_line(e)}); use key=value with a YAML value"
            ) from None
        updates.append((f"override {item!r}", key, value))
    return _build(layers, updates)


PACKAGED = "memlayers:"  # load_config("memlayers:NAME"): the example config NAME in memlayers/configs/


def packaged_configs() -> list[str]:
    """The names of the example configs shipped with memlayers; load one with ``load_config("memlayers:NAME")``."""
    return sorted(p.name.removesuffix(".yaml") for p in _packaged_dir().iterdir() if p.name.endswith(".yaml"))


def _packaged_dir():
    return importlib.resources.files("memlayers") / "configs"


def _config_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path; ``memlayers:NAME`` (or ``memlayers:NAME.yaml``) is the packaged example NAME."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text.startswith(PACKAGED):
        return Path(path)
    name = text.removeprefix(PACKAGED).removesuffix(".yaml")
    names = packaged_configs()
    if name not in names:
        raise FileNotFoundError(
            f"no config {text!r} ships with memlayers; available: {', '.join(PACKAGED + n for n in names)} "
            "(or pass the path of a YAML run config)"
        )
    return Path(str(_packaged_dir() / f"{name}.yaml"))  # installed packages are directories, not zips


def _load_yaml(path: str | os.PathLike):
    """``OmegaConf.load(path)``; unreadable YAML is a one-line ValueError."""
    try:
        return OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 (yaml.YAMLError and friends)
        where = " ".join(str(e).split())  # yaml's message spans lines
        raise ValueError(f"{path}: not valid YAML ({where}); fix the file's syntax") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping as a plain dict, as written (no schema, no defaults); ValueError if it is not one."""
    data = OmegaConf.to_container(_load_yaml(path), resolve=False)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return data


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as resolved YAML, atomically (see ``memlayers.train.checkpoint.atomic_write``)."""
    from .checkpoint import atomic_write

    text = cfg.to_yaml()
    atomic_write(path, lambda f: f.write(text.encode()))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": [1, {"c": 2}]}} -> {"a.b.0": 1, "a.b.1.c": 2}; empty dicts/lists stay as leaves."""
    if isinstance(data, dict) and data:
        out = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, (list, tuple)) and data:
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


# Keys added to the configs after runs were saved with them: what a saved config without the key did
# (other missing keys read as their field's default).
ADDED_KEYS = {"data.text.chunk_tokens": 0}
_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MemorySpec) if f.default is not dataclasses.MISSING}


def _added_default(key: str, defaults: dict, missing):
    """What a key reads as in a config saved before it existed: ``ADDED_KEYS``, the run default, or for a
    memory spec's field (``model.memories.<i>.<field>``, e.g. ``skip``, ``share``) the ``MemorySpec`` default."""
    if key in defaults:
        return defaults[key]
    parts = key.split(".")
    if len(parts) == 4 and parts[:2] == ["model", "memories"]:
        return _SPEC_DEFAULTS.get(parts[3], missing)
    return missing


def config_diff(saved: dict, requested: dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """[(dotted key, saved value, requested value)] for every leaf that differs that matters: keys under
    ``ignore`` and the data section of the kind not in use (``data.text.*`` for facts) are skipped, and a
    key a config lacks (saved by an older memlayers) reads as ``ADDED_KEYS`` or its default."""
    a, b = flatten(saved), flatten(requested)
    kind = b.get("data.kind")
    ignore = (*ignore, *(f"data.{k}" for k in ("facts", "text") if kind in ("facts", "text") and k != kind))
    defaults = {**flatten(RunConfig().to_dict()), **ADDED_KEYS}
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in ignore):
            continue
        va, vb = a.get(key, _added_default(key, defaults, missing)), b.get(key, _added_default(key, defaults, missing))
        if va != vb or type(va) is not type(vb) and not _same_number(va, vb):
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def _same_number(a, b) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and a == b


# ----------------------------------------------------------------------------------------------


def _first_line(e: Exception) -> str:
    return str(e).split("\n")[0]


def _build(layers: list[tuple[str, Any]], updates: list[tuple[str, str, Any]] = ()) -> RunConfig:
    """Merge the (source, OmegaConf node) layers onto the RunConfig schema, apply the (source, dotted
    key, value) updates (keys may index lists: ``model.memories[0].options.n_keys``) and instantiate
    the dataclasses."""
    merged = OmegaConf.structured(RunConfig)
    steps = [(source, lambda m, node=node: OmegaConf.merge(m, node)) for source, node in layers]
    steps += [(source, lambda m, k=key, v=value: _update(m, k, v)) for source, key, value in updates]
    for source, apply in steps:
        try:
            merged = apply(merged)
        except (ConfigKeyError, ConfigAttributeError) as e:
            raise ValueError(_unknown_key_message(e, source)) from None
        except ValidationError as e:
            raise ValueError(_bad_value_message(e, source)) from None
        except OmegaConfBaseException as e:
            raise ValueError(f"{source}: {_first_line(e)}") from None
    _validate_sections(merged)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"config: {_first_line(e)}") from None
    return cfg


def _validate_sections(node: Any, path: str = "") -> None:
    """Build every nested config dataclass, innermost first, so that a ``ValueError`` from its checks
    names the key as it is written in YAML and overrides (``model.moe.experts``, not ``MoESpec.experts``)."""
    children = node.items() if isinstance(node, DictConfig) else enumerate(node) if isinstance(node, ListConfig) else ()
    for key, child in children:
        _validate_sections(child, f"{path}[{key}]" if isinstance(node, ListConfig) else f"{path}.{key}".lstrip("."))
    cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) and path else None
    if cls is None or not dataclasses.is_dataclass(cls):
        return
    try:
        OmegaConf.to_object(node)
    except ValueError as e:
        msg = str(e).removeprefix(f"{cls.__name__}.")
        for key, child in node.items():  # a check of a child's fields the child itself skips (DataConfig's of facts)
            child_cls = OmegaConf.get_type(child) if isinstance(child, DictConfig) else None
            if child_cls is not None and msg.startswith(f"{child_cls.__name__}."):
                msg = f"{key}." + msg.removeprefix(f"{child_cls.__name__}.")
        raise ValueError(msg if msg.startswith(f"{path}.") else f"{path}.{msg}") from None


def _update(merged: DictConfig, key: str, value: Any) -> DictConfig:
    for index in re.finditer(r"\[(\d+)\]", key):  # OmegaConf's own error for a missing item is a type error
        items = OmegaConf.select(merged, key[: index.start()])
        if isinstance(items, ListConfig) and int(index.group(1)) >= len(items):
            raise ValueError(
                f"config key {key!r}: {key[: index.start()]} has {len(items)} item(s), so index {index.group(1)} "
                f"does not exist; to add items, give the whole list, e.g. {key[: index.start()]}=[...]"
            )
    OmegaConf.update(merged, key, value, merge=True)
    return merged


def _valid_keys(e: OmegaConfBaseException) -> str:
    cls = getattr(e, "object_type", None)
    if cls is not None and dataclasses.is_dataclass(cls):
        return f"valid keys of {cls.__name__}: {', '.join(f.name for f in dataclasses.fields(cls))}"
    return "see the dataclasses in memlayers.train.config / memlayers.model / memlayers.data"


def _unknown_key_message(e: ConfigKeyError, source: str) -> str:
    key = str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")
    cls = getattr(e, "object_type", None)
    hint = ""
    if cls is not None and dataclasses.is_dataclass(cls):
        parent, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(cls)], n=3)
        if close:
            hint = " (did you mean " + " or ".join(repr(f"{parent}.{c}" if parent else c) for c in close) + "?)"
    return f"unknown config key {key!r} in {source}{hint}; fix or remove it ({_valid_keys(e)})"


def _bad_value_message(e: ValidationError, source: str) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    return f"config key {key!r} in {source}: {_first_line(e)}; give a value of the field's type"
