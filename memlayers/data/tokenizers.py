"""Tokenizers: bytes for real text, whole words for the synthetic facts corpus.

Both follow one small protocol (``Tokenizer``): ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``,
``encode(str) -> list[int]`` and ``decode(list[int]) -> str``. ``encode`` never adds bos/eos (the
datasets frame each document as ``[bos] + encode(text) + [eos]``); ``decode`` drops the special tokens.
"""

import re
from collections.abc import Iterable
from typing import Protocol

# A word is a run of letters/digits/underscores; every other non-space character is its own token.
# So "birth_city" is one token and "Lani ." / "Lani." both give ["Lani", "."].
_WORD_RE = re.compile(r"\w+|[^\w\s]")

SPECIALS = ("<pad>", "<bos>", "<eos>")


def split_words(text: str) -> list[str]:
    """The word tokens of ``text``: whitespace separates, punctuation is its own token."""
    return _WORD_RE.findall(text)


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are the bytes, then pad=256, bos=257, eos=258 (vocab_size 259)."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids {bad[:5]} outside [0, {self.vocab_size})")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class WordTokenizer:
    """A closed word vocabulary: pad=0, bos=1, eos=2, then ``vocab[i]`` has id ``3 + i``.

    Text is split by ``split_words`` (whitespace, punctuation as separate tokens); a word outside the
    vocabulary is an error (the facts corpus is closed, so an unknown word is a bug, not a rare word).
    ``decode`` joins words with single spaces, so ``decode(encode(t)) == " ".join(split_words(t))``.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2

    def __init__(self, vocab: list[str]):
        vocab = list(vocab)
        seen: set[str] = set()
        for word in vocab:
            if word in SPECIALS:
                raise ValueError(f"WordTokenizer: {word!r} is reserved for a special token; leave it out of vocab")
            if split_words(word) != [word]:
                raise ValueError(f"WordTokenizer: vocab entry {word!r} is not a single word token (see split_words)")
            if word in seen:
                raise ValueError(f"WordTokenizer: duplicate vocab entry {word!r}")
            seen.add(word)
        self.words = list(SPECIALS) + vocab
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """The sorted set of words of ``texts`` (deterministic: independent of text order)."""
        words: set[str] = set()
        for text in texts:
            words.update(split_words(text))
        return cls(sorted(words))

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in split_words(text):
            i = self.ids.get(word)
            if i is None or i < len(SPECIALS):
                raise ValueError(
                    f"WordTokenizer.encode: unknown word {word!r} (not in the {self.vocab_size}-token vocabulary); "
                    "the word tokenizer only knows the words of the corpus it was built from"
                )
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by single spaces; pad/bos/eos are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"WordTokenizer.decode: id {i} outside [0, {self.vocab_size})")
            if i >= len(SPECIALS):
                out.append(self.words[i])
        return " ".join(out)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"
