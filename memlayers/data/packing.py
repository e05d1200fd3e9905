"""PackedStream: documents packed into an infinite, seeded, randomly addressable token stream.

Each epoch concatenates every document once, in a fresh permutation drawn from ``(seed, epoch)``;
epochs follow each other into one infinite stream. Row ``r`` of the training data is the window
``stream[r*T : r*T + T + 1]`` (x = its first T tokens, y = its last T), and step ``s`` with batch size
``B`` is rows ``s*B .. s*B + B - 1``, i.e. the contiguous window ``stream[s*B*T : (s+1)*B*T + 1]``.
So consecutive rows tile the stream: every token is a target exactly once per epoch, every document
is seen once per epoch, and rows cross document (and epoch) boundaries freely (documents carry their
own bos/eos).

``batch(step, batch_size)`` is a pure function of ``(docs, seq_len, seed, step, batch_size)``: there is
no iterator state, so resuming a run at step ``s`` needs only ``s``. An epoch's token sequence is built
on demand (one gather, O(tokens per epoch)) and the last two epochs are cached, so a batch is a slice.
"""

import itertools
import random
from collections import OrderedDict
from collections.abc import Sequence

import torch

_CACHED_EPOCHS = 2


def _epoch_seed(seed: int, epoch: int) -> int:
    # A stable 63-bit seed per (seed, epoch): Random(str) hashes the string with SHA-512.
    return random.Random(f"memlayers.PackedStream:{seed}:{epoch}").getrandbits(63)


class PackedStream:
    """Infinite packed stream over ``docs`` (each a non-empty sequence of token ids, already framed bos...eos).

    Args:
        docs: list of documents, each a list of ints or a 1-D integer tensor.
        seq_len: T, the length of x and y.
        seed: chooses the per-epoch document permutations.
    """

    def __init__(self, docs: Sequence[Sequence[int] | torch.Tensor], seq_len: int, seed: int = 0):
        if seq_len < 1:
            raise ValueError(f"PackedStream: seq_len must be >= 1, got {seq_len}")
        if len(docs) == 0:
            raise ValueError("PackedStream: no documents to pack")
        lengths = [len(d) for d in docs]
        if min(lengths) == 0:
            raise ValueError(f"PackedStream: document {lengths.index(0)} is empty; drop empty documents first")
        if all(isinstance(d, torch.Tensor) for d in docs):
            flat = torch.cat([d.reshape(-1) for d in docs]).to(torch.int64)
        else:
            flat = torch.tensor(
                list(itertools.chain.from_iterable(d.tolist() if isinstance(d, torch.Tensor) else d for d in docs)),
                dtype=torch.int64,
            )
        if flat.min() < 0 or flat.max() >= 2**31:
            raise ValueError("PackedStream: token ids must be in [0, 2**31)")
        self.seq_len = seq_len
        self.seed = seed
        # (tokens_per_epoch,) all documents in their given order, in the narrowest dtype that holds the ids
        # (bytes and word vocabularies fit int16: 2 bytes a token here and in each cached epoch)
        self.flat = flat.to(torch.int16 if flat.max() < 2**15 else torch.int32)
        self.lengths = torch.tensor(lengths, dtype=torch.int64)  # (n_docs,)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths  # (n_docs,) offset of each doc in flat
        self.n_docs = len(lengths)
        self.tokens_per_epoch = int(self.lengths.sum())
        self._epochs: OrderedDict[int, torch.Tensor] = OrderedDict()

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """perm (n_docs,) int64: the documents of ``epoch`` in stream order."""
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.n_docs, generator=g)

    def epoch_tokens(self, epoch: int) -> torch.Tensor:
        """(tokens_per_epoch,) int16 or int32: the stream's tokens of ``epoch`` (the last two epochs are cached)."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        perm = self.epoch_order(epoch)
        lengths = self.lengths[perm]
        begin = torch.cumsum(lengths, 0) - lengths  # where each permuted document starts in the epoch
        index = torch.arange(self.tokens_per_epoch) + torch.repeat_interleave(self.starts[perm] - begin, lengths)
        tokens = self.flat[index]
        self._epochs[epoch] = tokens
        if len(self._epochs) > _CACHED_EPOCHS:
            self._epochs.popitem(last=False)
        return tokens

    def window(self, start: int, length: int) -> torch.Tensor:
        """``stream[start : start + length]`` -> (length,) int64 (may span several epochs)."""
        if start < 0 or length < 0:
            raise ValueError(f"PackedStream.window: need start >= 0 and length >= 0, got {start}, {length}")
        n = self.tokens_per_epoch
        parts = []
        while length > 0:
            epoch, offset = divmod(start, n)
            take = min(length, n - offset)
            parts.append(self.epoch_tokens(epoch)[offset : offset + take])
            start, length = start + take, length - take
        return torch.cat(parts).to(torch.int64) if parts else torch.empty(0, dtype=torch.int64)

    def rows(self, first_row: int, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``first_row .. first_row + n_rows - 1`` -> (x (n_rows, T), y (n_rows, T)) int64, y = x shifted by one."""
        if first_row < 0 or n_rows < 1:
            raise ValueError(f"PackedStream.rows: need first_row >= 0 and n_rows >= 1, got {first_row}, {n_rows}")
        T = self.seq_len
        w = self.window(first_row * T, n_rows * T + 1)  # consecutive rows overlap by one token
        return w[:-1].view(n_rows, T), w[1:].view(n_rows, T)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch ``step`` -> (x (B, T), y (B, T)) int64: rows ``step*B .. step*B + B - 1``."""
        if step < 0:
            raise ValueError(f"PackedStream.batch: step must be >= 0, got {step}")
        if batch_size < 1:
            raise ValueError(f"PackedStream.batch: batch_size must be >= 1, got {batch_size}")
        return self.rows(step * batch_size, batch_size)

    def rows_per_epoch(self) -> int:
        """Rows needed to cover one epoch's tokens: ceil(tokens_per_epoch / T)."""
        return -(-self.tokens_per_epoch // self.seq_len)

    def __repr__(self) -> str:
        return (
            f"PackedStream(n_docs={self.n_docs}, tokens_per_epoch={self.tokens_per_epoch}, "
            f"seq_len={self.seq_len}, seed={self.seed})"
        )


def fixed_batches(
    stream: PackedStream, batch_size: int, limit: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first rows of ``stream`` as a fixed list of (x (b, T), y (b, T)) batches, b <= batch_size.

    ``limit`` caps the number of rows (sequences); ``None`` (or a larger limit) gives exactly one epoch,
    ceil(tokens_per_epoch / T) rows, with the targets that would run into the next epoch set to -100
    (ignored), so no token is counted twice. Only the last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (rows) or None (one epoch), got {limit}")
    n_rows = stream.rows_per_epoch() if limit is None else min(limit, stream.rows_per_epoch())
    T, end = stream.seq_len, stream.tokens_per_epoch
    batches = []
    for r in range(0, n_rows, batch_size):
        x, y = stream.rows(r, min(batch_size, n_rows - r))
        # targets past the epoch's last token belong to the next epoch: ignore them
        position = r * T + 1 + torch.arange(y.numel()).view(y.shape)  # stream index of each target
        batches.append((x, y.masked_fill(position >= end, -100)))
    return batches


class PackedDataset:
    """Batching shared by the datasets: training rows from ``documents`` packed with ``seed``, validation
    rows from ``val_documents`` packed with ``val_seed``, each by a ``PackedStream`` cached per length.

    Subclasses set those four attributes in ``__init__``.
    """

    documents: list
    seed: int
    val_documents: list
    val_seed: int

    def stream(self, seq_len: int) -> PackedStream:
        """The training stream for sequence length ``seq_len`` (cached)."""
        streams = self.__dict__.setdefault("_streams", {})
        if seq_len not in streams:
            streams[seq_len] = PackedStream(self.documents, seq_len, seed=self.seed)
        return streams[seq_len]

    def train_batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch ``step`` -> (x (B, T), y (B, T)) int64, y = x shifted by one; pure in (config, step)."""
        return self.stream(seq_len).batch(step, batch_size)

    def val_batches(
        self, batch_size: int, seq_len: int, limit: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of (x (b, T), y (b, T)) validation batches (see ``val_documents``).

        ``limit`` = at most this many rows (sequences); ``None`` = every validation document once.
        Same arguments, same batches; [] when there are no validation documents.
        """
        if not self.val_documents:
            return []
        streams = self.__dict__.setdefault("_val_streams", {})
        if seq_len not in streams:
            streams[seq_len] = PackedStream(self.val_documents, seq_len, seed=self.val_seed)
        return fixed_batches(streams[seq_len], batch_size, limit)
