"""Engram (DeepSeek, arXiv 2601.07372): hashed n-gram embeddings read by token ids, gated by the hidden state.

Each token reads one row per hash head of each n-gram order 2..max_n (``HashedNGrams``); the rows are
concatenated (``ConcatTable``) into e, and ``EngramReadout`` returns ``g * W_v e`` plus a short causal
convolution of it, g a sigmoid gate from the hidden state. The slots depend on the token ids only.
"""

from dataclasses import dataclass, replace

from ..addressing.ngram_hash import HashedNGrams, next_primes
from ..config import LayerConfig
from ..readouts.engram_gate import EngramReadout
from ..registry import register_kind, register_preset
from ..stores.concat_table import ConcatTable


@register_kind
@dataclass(frozen=True)
class EngramConfig(LayerConfig):
    """A hashed n-gram memory layer (see ``LayerConfig`` for the shared fields).

    max_n: n-gram orders 2..max_n are hashed.
    hash_heads: hash heads per order; the layer reads H = (max_n - 1) * hash_heads rows per token.
    d_ngram: width per order, split over its hash heads (rows of d_ngram / hash_heads); default dim.
        e, what the readout sees, is (max_n - 1) * d_ngram wide.
    table_size: rows per head before rounding up to a prime (heads get distinct primes); None = 5 x
        vocab_size, filled in by ``in_model`` (a ``Transformer`` does it).
    vocab_size: the tokenizer's vocabulary; None = the host model's (``in_model``). Needed for
        ``canonical_ids`` and the default table_size.
    seed: draws the hash multipliers (two layers with one seed hash alike; their tables still differ).
    short_conv, conv_kernel: the readout's causal depthwise convolution (dilation max_n).
    canonical_ids: hash canonical token ids (the paper's tokenizer compression): the addressing gets an
        ``id_map`` buffer, the identity until set from the tokenizer with
        ``layer.addressing.set_canonical_ids(tokenizer_decode)`` (or ``set_id_map``); it is saved with the model.

    In a ``Transformer`` the memory sits in a block's FFN slot: mode "beside" adds it to the FFN's output.
    """

    kind = "engram"
    ring_shareable = False  # slot ids are per-head table rows: a window offset would mix the heads' tables

    max_n: int = 3
    hash_heads: int = 8
    d_ngram: int | None = None
    table_size: int | None = None
    vocab_size: int | None = None
    seed: int = 0
    short_conv: bool = True
    conv_kernel: int = 4
    canonical_ids: bool = False

    def derive(self) -> None:
        if self.d_ngram is None:
            self.set("d_ngram", self.dim)
        if self.table_size is None and self.vocab_size is not None and self.vocab_size >= 1:
            self.set("table_size", 5 * self.vocab_size)

    def validate(self) -> None:
        super().validate()
        if self.max_n < 2:
            self.fail("max_n", f"must be >= 2, got {self.max_n}", "use e.g. 3 (bigrams and trigrams)")
        if self.hash_heads < 1:
            self.fail("hash_heads", f"must be >= 1, got {self.hash_heads}", "use e.g. 8")
        if self.d_ngram < 1 or self.d_ngram % self.hash_heads:
            self.fail(
                "d_ngram",
                f"must be >= 1 and divisible by hash_heads={self.hash_heads}, got {self.d_ngram}",
                "use a multiple of hash_heads",
            )
        for name in ("table_size", "vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                self.fail(name, f"must be >= 1 or None, got {getattr(self, name)}", "use None for the default")
        if self.seed < 0:
            self.fail("seed", f"must be >= 0, got {self.seed}", "use e.g. 0")
        if self.conv_kernel < 1:
            self.fail("conv_kernel", f"must be >= 1, got {self.conv_kernel}", "use e.g. 4, or short_conv=False")

    def in_model(self, n_layers: int, vocab_size: int | None) -> "EngramConfig":
        if vocab_size is None:
            return self
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            self.fail("vocab_size", f"is {self.vocab_size} but the model's is {vocab_size}", "leave it None in a model")
        return replace(self, vocab_size=vocab_size, table_size=self.table_size or 5 * vocab_size)

    @property
    def heads(self) -> int:
        """H: rows read per token, hash_heads per order."""
        return (self.max_n - 1) * self.hash_heads

    @property
    def d_head(self) -> int:
        return self.d_ngram // self.hash_heads

    def _table_size(self) -> int:
        if self.table_size is None:
            self.fail(
                "table_size",
                "is None and no vocab_size to derive it from",
                "set table_size (rows per head, e.g. 5 x the vocabulary) or vocab_size, or build inside a Transformer",
            )
        return self.table_size

    @property
    def num_slots(self) -> int:
        return sum(next_primes(self._table_size(), self.heads))

    def make_addressing(self) -> HashedNGrams:
        if self.canonical_ids and self.vocab_size is None:
            self.fail(
                "vocab_size", "is None but canonical_ids needs it", "set vocab_size or build inside a Transformer"
            )
        vocab = self.vocab_size if self.canonical_ids else None
        return HashedNGrams(self.max_n, self.hash_heads, self._table_size(), self.seed, vocab)

    def make_pool(self, rows: int | None = None) -> ConcatTable:
        return ConcatTable(rows or self.num_slots, self.d_head, self.heads, sparse_grad=self.sparse_values)

    def make_readout(self) -> EngramReadout:
        c = self
        return EngramReadout(c.dim, c.heads * c.d_head, c.short_conv, c.conv_kernel, dilation=c.max_n)

    def pool_signature(self) -> dict:
        return {
            "num_slots": None if self.table_size is None else self.num_slots,  # None: sized later from the vocabulary
            "out_dim": self.heads * self.d_head,
            "sparse_grad": self.sparse_values,
            "heads": self.heads,
        }


register_preset(
    "engram",
    EngramConfig,
    lambda dim: {"max_n": 3, "hash_heads": 8, "d_ngram": dim},
    "Engram (DeepSeek 2026): 2- and 3-gram hashes, 8 heads per order, d_ngram = dim, 5 x vocab rows per head, "
    "gated + short conv; place it in early blocks (the paper: blocks 1 and 15 of 30), mode 'beside'",
)
