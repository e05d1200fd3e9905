"""Datasets for training transformers with memory layers: synthetic facts (measure memory) and local text.

``build_dataset(DataConfig)`` returns a ``FactsDataset`` or a ``TextDataset`` (``build_tokenizer(DataConfig)``
just its tokenizer, reading no corpus); both offer

    tokenizer, vocab_size
    train_batch(step, batch_size, seq_len) -> (x (B, T), y (B, T)) int64   # pure in (config, step): resumable
    val_batches(batch_size, seq_len, limit=None) -> [(x (b, T), y (b, T)), ...]  # fixed; limit = max rows;
                                                   # [] without validation (text, val_fraction=0)
    probes(format) -> list[Probe]   # facts: recall questions; text: []
    probe_formats                   # the formats worth probing (facts: the trained ones; text: none)
    describe() -> dict              # small JSON-able summary
"""

from dataclasses import dataclass, field

from .facts import ATTRIBUTES, FORMATS, FactsConfig, FactsDataset, Person, Probe, generate_choices, generate_people
from .facts import validate as validate_facts
from .packing import PackedStream, fixed_batches
from .text import TextConfig, TextDataset
from .tokenizers import ByteTokenizer, WordTokenizer, split_words

KINDS = ("facts", "text")


@dataclass
class DataConfig:
    """Which dataset to train on: kind "facts" (uses ``facts``) or "text" (uses ``text``). ``order_seed``: the
    seed of the training order (how documents are shuffled into batches, epoch by epoch); None: the dataset's
    own seed. Another order_seed keeps the facts or the text split and changes only the order."""

    kind: str = "facts"
    facts: FactsConfig = field(default_factory=FactsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    order_seed: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"DataConfig.kind: unknown {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind == "facts":
            validate_facts(self.facts)  # text paths are checked when the corpus is read


def build_tokenizer(cfg: DataConfig) -> WordTokenizer | ByteTokenizer:
    """The tokenizer of the dataset ``cfg`` describes, without reading a text corpus (facts: built from the
    generated world, as ``FactsDataset`` does; text: ``TextConfig.tokenizer``)."""
    if cfg.kind == "facts":
        return FactsDataset(cfg.facts).tokenizer  # the world is small and generated: ~0.1 s for 1000 people
    if cfg.kind == "text":
        if cfg.text.tokenizer != "byte":
            raise ValueError(f"TextConfig.tokenizer: unknown {cfg.text.tokenizer!r}; choose one of byte")
        return ByteTokenizer()
    raise ValueError(f"DataConfig.kind: unknown {cfg.kind!r}; choose one of {', '.join(KINDS)}")


def build_dataset(cfg: DataConfig) -> FactsDataset | TextDataset:
    """The dataset ``cfg.kind`` names, built from its sub-config (its training order from ``cfg.order_seed``)."""
    if cfg.kind not in KINDS:
        raise ValueError(f"DataConfig.kind: unknown {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    dataset = FactsDataset(cfg.facts) if cfg.kind == "facts" else TextDataset(cfg.text)
    if cfg.order_seed is not None:
        dataset.seed = cfg.order_seed  # (the packed streams are made on first use)
    return dataset


__all__ = [
    "ATTRIBUTES",
    "FORMATS",
    "KINDS",
    "ByteTokenizer",
    "DataConfig",
    "FactsConfig",
    "FactsDataset",
    "PackedStream",
    "Person",
    "Probe",
    "TextConfig",
    "TextDataset",
    "WordTokenizer",
    "build_dataset",
    "build_tokenizer",
    "fixed_batches",
    "generate_choices",
    "generate_people",
    "split_words",
]
