"""Hashed n-gram addressing (Engram, DeepSeek, arXiv 2601.07372): a token's slots are hashes of the
n-grams ending at it, known from the token ids alone (before the forward pass)."""

import math
import re
import unicodedata
from collections.abc import Callable

import torch

from ..parts import Addressing

PAD_ID = -1  # stands for the positions before a sequence's start; no token id is negative
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic Miller-Rabin below 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for every n < 3.3e24, i.e. any table size)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_primes(start: int, count: int) -> list[int]:
    """The ``count`` smallest primes >= ``start``, increasing (so distinct)."""
    primes, n = [], max(2, start)
    while len(primes) < count:
        if is_prime(n):
            primes.append(n)
        n += 1
    return primes


def draw_multipliers(seed: int, max_n: int, hash_heads: int) -> torch.Tensor:
    """The hash multipliers, (max_n - 1, hash_heads, max_n) int64: row (order n, head j) is ``[n - 2, j]``.

    ``torch.randint(-2**63, 2**63 - 1, shape, dtype=torch.int64, generator=torch.Generator().manual_seed(seed)) | 1``
    (odd), then entries k >= n of order n's rows set to 0 (an order-n hash mixes n ids; a zero product is
    XOR's identity, so all orders share one loop).
    """
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(-(2**63), 2**63 - 1, (max_n - 1, hash_heads, max_n), dtype=torch.int64, generator=g) | 1
    n = torch.arange(2, max_n + 1).view(-1, 1, 1)
    return m.masked_fill(torch.arange(max_n) >= n, 0)


def canonical_id_map(decode: Callable[[int], str], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: each id -> the smallest id whose decoded text has the same canonical form.

    Canonical form (the paper's tokenizer compression): NFKC, lower case, runs of whitespace folded to
    one space and leading/trailing whitespace dropped (so " The" ~ "the"); a text of whitespace only
    becomes " ". A text holding U+FFFD (a partial UTF-8 byte of a byte-level tokenizer) keeps its own id:
    such tokens all decode to the same replacement character but differ.
    """
    first: dict[str, int] = {}
    out = torch.empty(vocab_size, dtype=torch.int64)
    for i in range(vocab_size):
        text = decode(i)
        if "\ufffd" in text:
            out[i] = i
            continue
        folded = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).lower())
        out[i] = first.setdefault(folded.strip() or folded, i)
    return out


class HashedNGrams(Addressing):
    """Slots of the 2..max_n-grams ending at each token, ``hash_heads`` hashes per order; no parameters.

    At position t, order n, head j (of order n): with ``c`` the token ids (through ``id_map`` if set) and
    ``c[t - i] = PAD_ID`` (-1) before the sequence's start,
    ``mix = (c[t]·m_0) XOR (c[t-1]·m_1) XOR ... XOR (c[t-n+1]·m_{n-1})`` in int64 (wrapping products;
    ``m`` = ``multipliers[n - 2, j]``, see ``draw_multipliers``) and the slot is
    ``offset_h + (mix mod p_h)`` (mod non-negative), h = (n - 2)·hash_heads + j the head's index.
    The p_h are the H = (max_n - 1)·hash_heads smallest primes >= ``table_size``, one table per head,
    stacked in one store: ``offset_h = p_0 + ... + p_{h-1}``, ``num_slots = sum p_h``.

    forward(x (T, dim), mask, token_ids (..., S) with T = prod, state) -> ids (T, H, 1) int64, weights
    (T, H, 1) float32 ones (the readout concatenates the H rows). Hashing is integer work: flops 0.
    mask (T,) bool or None: padding (False) hashes as ``PAD_ID``, like the positions before a sequence's
    start, so a left-padded sequence's real tokens read the rows they read unpadded (after a gap of padding
    inside a sequence the n-grams start again, as at a sequence's start).
    state (decoding): holds each sequence's last max_n - 1 ids, so that feeding a sequence in pieces
    gives the ids of one call on the whole of it.

    vocab_size: when given, an ``id_map`` buffer (vocab_size,) int64, the identity until ``set_id_map`` or
    ``set_canonical_ids`` fills it, maps token ids before hashing (the paper's tokenizer compression).
    """

    needs_token_ids = ids_from_tokens = True

    def __init__(self, max_n: int, hash_heads: int, table_size: int, seed: int = 0, vocab_size: int | None = None):
        super().__init__()
        if max_n < 2 or hash_heads < 1 or table_size < 1:
            raise ValueError(
                f"HashedNGrams: need max_n >= 2, hash_heads >= 1 and table_size >= 1, "
                f"got {max_n}, {hash_heads}, {table_size}"
            )
        self.max_n, self.hash_heads, self.table_size, self.seed = max_n, hash_heads, table_size, seed
        self.heads, self.topk, self.grid = (max_n - 1) * hash_heads, 1, None
        self._primes = next_primes(table_size, self.heads)
        self.num_slots = sum(self._primes)
        self.register_buffer("multipliers", draw_multipliers(seed, max_n, hash_heads).view(self.heads, max_n))
        self.register_buffer("primes", torch.empty(self.heads, dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.empty(self.heads, dtype=torch.int64), persistent=False)
        self.reset_buffers()
        id_map = None if vocab_size is None else torch.arange(vocab_size, dtype=torch.int64)
        self.register_buffer("id_map", id_map)

    def reset_buffers(self) -> None:
        """primes (H,): the heads' table sizes; offsets (H,): where each head's table starts."""
        if self.primes.is_meta:
            return
        with torch.no_grad():
            self.primes.copy_(torch.tensor(self._primes))
            self.offsets.copy_(torch.tensor([0, *self._primes[:-1]]).cumsum(0))

    def _require_id_map(self) -> torch.Tensor:
        if self.id_map is None:
            raise ValueError(
                "HashedNGrams: this addressing has no id_map; "
                "build it with vocab_size (EngramConfig(canonical_ids=True))"
            )
        return self.id_map

    def set_id_map(self, id_map: torch.Tensor) -> None:
        """Hash ``id_map[token]`` instead of ``token``: id_map (vocab_size,) integer."""
        own = self._require_id_map()
        if id_map.shape != own.shape or id_map.is_floating_point() or id_map.dtype == torch.bool:
            raise ValueError(
                f"HashedNGrams: id_map must be an integer tensor of shape {tuple(own.shape)}, "
                f"got {id_map.dtype} {tuple(id_map.shape)}"
            )
        own.copy_(id_map)

    def set_canonical_ids(self, decode: Callable[[int], str]) -> None:
        """Fill ``id_map`` from a tokenizer's ``decode(id) -> text`` (see ``canonical_id_map``)."""
        self.set_id_map(canonical_id_map(decode, self._require_id_map().numel()))

    def bind_tokenizer(self, decode: Callable[[list[int]], str]) -> None:
        """With canonical ids (an ``id_map``), fill it from the tokenizer's ``decode(ids) -> text``."""
        if self.id_map is not None:
            self.set_canonical_ids(lambda i: decode([i]))

    def forward(self, x: torch.Tensor, mask=None, token_ids: torch.Tensor | None = None, state: dict | None = None):
        if token_ids is None:
            raise ValueError("HashedNGrams: token_ids are required (the slots are hashes of the token ids)")
        seq = token_ids.shape[-1] if token_ids.dim() else 1
        rows = math.prod(token_ids.shape[:-1]) if token_ids.dim() else 1
        ids = token_ids.reshape(rows, seq).long()
        padding = None if mask is None else ~mask.reshape(rows, seq)
        if self.id_map is not None:
            V = self.id_map.shape[0]
            if padding is not None:  # whatever padding holds (e.g. -100) is not looked up
                ids = ids.masked_fill(padding, 0)
            if ids.device.type == "cpu" and ids.numel() and not bool(((ids >= 0) & (ids < V)).all()):  # no sync on GPUs
                raise ValueError(f"HashedNGrams: token ids must be in [0, vocab_size={V}) with canonical ids")
            ids = self.id_map[ids]
        if padding is not None:
            ids = ids.masked_fill(padding, PAD_ID)
        back = self.max_n - 1
        history = None if state is None else state.get("ngram_history")
        if history is None:
            history = ids.new_full((rows, back), PAD_ID)
        elif history.shape[0] != rows:
            raise ValueError(f"HashedNGrams: decoding state holds {history.shape[0]} sequences, the input {rows}")
        ids = torch.cat((history, ids), 1)  # (rows, back + seq)
        if state is not None:
            state["ngram_history"] = ids[:, seq:]
        mix = None
        for i in range(self.max_n):  # XOR in c[t - i] * m_i
            term = ids[:, back - i : back - i + seq].reshape(-1, 1) * self.multipliers[:, i]  # (T, H)
            mix = term if mix is None else mix ^ term
        slots = self.offsets + torch.remainder(mix, self.primes)  # (T, H)
        return slots.unsqueeze(-1), torch.ones(*slots.shape, 1, device=slots.device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return (
            f"max_n={self.max_n}, hash_heads={self.hash_heads}, table_size={self.table_size}, seed={self.seed}, "
            f"num_slots={self.num_slots}"
        )
