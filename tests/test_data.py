"""Tokenizers, PackedStream and build_dataset."""

import itertools

import pytest
import torch

from memlayers.data import (
    ByteTokenizer,
    DataConfig,
    FactsConfig,
    FactsDataset,
    PackedStream,
    TextConfig,
    TextDataset,
    WordTokenizer,
    build_dataset,
    fixed_batches,
    split_words,
)

# -- tokenizers ----------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓\n\tdef f(x): return x"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259 and {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def test_split_words_punctuation_and_underscores():
    assert split_words("Q : what is x_y of Ab Cd? A: 17 March.") == [
        "Q",
        ":",
        "what",
        "is",
        "x_y",
        "of",
        "Ab",
        "Cd",
        "?",
        "A",
        ":",
        "17",
        "March",
        ".",
    ]


def test_word_tokenizer_round_trip_and_layout():
    tok = WordTokenizer.from_texts(["the cat sat .", "a dog , the end"])
    assert tok.words[:3] == ["<pad>", "<bos>", "<eos>"] and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.words[3:] == sorted({"the", "cat", "sat", ".", "a", "dog", ",", "end"})
    assert tok.vocab_size == 3 + 8
    text = "the dog sat , the cat ."
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("the dog sat, the cat.")) == text  # punctuation split off
    assert tok.decode([tok.bos_id] + tok.encode("a cat") + [tok.eos_id]) == "a cat"
    # deterministic: independent of text order
    assert WordTokenizer.from_texts(["a dog , the end", "the cat sat ."]).words == tok.words


def test_word_tokenizer_errors():
    tok = WordTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="unknown word 'c'"):
        tok.encode("a c b")
    with pytest.raises(ValueError, match="unknown word '<'"):
        tok.encode("<bos>")
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="reserved"):
        WordTokenizer(["<eos>"])
    with pytest.raises(ValueError, match="single word"):
        WordTokenizer(["two words"])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([5])


# -- PackedStream --------------------------------------------------------------------------------------


def _docs(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        length = int(torch.randint(1, 12, (1,), generator=g))
        body = torch.randint(3, 50, (length,), generator=g).tolist()
        docs.append([1] + body + [2])  # bos ... eos
    return docs


def test_packed_stream_is_pure_in_step():
    docs = _docs()
    s = PackedStream(docs, seq_len=16, seed=3)
    x5, y5 = s.batch(5, 4)
    for step in (0, 1, 2, 50, 500, 7, 10_000):  # touches many epochs, evicting the cache
        s.batch(step, 4)
    x5b, y5b = s.batch(5, 4)
    assert torch.equal(x5, x5b) and torch.equal(y5, y5b)
    fresh = PackedStream(docs, seq_len=16, seed=3)
    xf, yf = fresh.batch(5, 4)
    assert torch.equal(x5, xf) and torch.equal(y5, yf)
    # tensor documents give the same stream
    xt, _ = PackedStream([torch.tensor(d) for d in docs], seq_len=16, seed=3).batch(5, 4)
    assert torch.equal(x5, xt)
    # another seed gives other batches
    assert not torch.equal(x5, PackedStream(docs, seq_len=16, seed=4).batch(5, 4)[0])


def test_packed_stream_shift_and_tiling():
    s = PackedStream(_docs(), seq_len=16, seed=0)
    x, y = s.batch(3, 8)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert torch.equal(x[1:, 0], y[:-1, -1])  # consecutive rows tile the stream
    x4, _ = s.batch(4, 8)
    assert x4[0, 0] == y[-1, -1]  # and consecutive steps continue it
    w = s.window(3 * 8 * 16, 8 * 16 + 1)
    assert torch.equal(x.reshape(-1), w[:-1]) and torch.equal(y.reshape(-1), w[1:])


def test_packed_stream_covers_every_document_each_epoch():
    docs = _docs()
    s = PackedStream(docs, seq_len=8, seed=1)
    n = s.tokens_per_epoch
    assert n == sum(map(len, docs))
    orders = []
    for epoch in range(3):
        tokens = s.window(epoch * n, n).tolist()
        assert tokens == s.epoch_tokens(epoch).tolist()
        # split the epoch at bos: exactly the documents, each once
        starts = [i for i, t in enumerate(tokens) if t == 1] + [n]
        pieces = [tokens[a:b] for a, b in itertools.pairwise(starts)]
        assert sorted(pieces) == sorted(docs)
        orders.append(s.epoch_order(epoch).tolist())
        assert sorted(orders[-1]) == list(range(len(docs)))
    assert orders[0] != orders[1] != orders[2]  # a fresh permutation every epoch
    # the training rows over the first epoch read exactly epoch 0's tokens
    rows = s.rows_per_epoch()
    x, _ = s.rows(0, rows)
    assert x.reshape(-1)[:n].tolist() == s.epoch_tokens(0).tolist()
    # a window crossing an epoch boundary
    w = s.window(n - 5, 10).tolist()
    assert w == s.epoch_tokens(0)[-5:].tolist() + s.epoch_tokens(1)[:5].tolist()


def test_packed_stream_errors():
    with pytest.raises(ValueError, match="empty"):
        PackedStream([[1, 2], []], seq_len=4)
    with pytest.raises(ValueError, match="no documents"):
        PackedStream([], seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        PackedStream([[1, 2]], seq_len=0)
    s = PackedStream([[1, 2, 3]], seq_len=4)
    with pytest.raises(ValueError, match="step"):
        s.batch(-1, 2)
    with pytest.raises(ValueError, match="batch_size"):
        s.batch(0, 0)


def test_fixed_batches_limit_and_epoch():
    s = PackedStream(_docs(), seq_len=8, seed=0)
    full = fixed_batches(s, batch_size=5)
    assert sum(x.shape[0] for x, _ in full) == s.rows_per_epoch()
    assert all(x.shape[0] == 5 for x, _ in full[:-1]) and 1 <= full[-1][0].shape[0] <= 5
    some = fixed_batches(s, batch_size=5, limit=7)
    assert [x.shape[0] for x, _ in some] == [5, 2]
    assert torch.equal(some[0][0], full[0][0]) and torch.equal(some[1][0], full[1][0][:2])
    assert sum(x.shape[0] for x, _ in fixed_batches(s, 5, limit=10**6)) == s.rows_per_epoch()
    # one epoch's targets exactly: the stream's tokens 1 .. tokens_per_epoch - 1, each once, none from the next
    targets = torch.cat([y.flatten() for _, y in full])
    kept = targets[targets != -100]
    assert kept.numel() == s.tokens_per_epoch - 1
    assert torch.equal(kept, s.window(1, s.tokens_per_epoch - 1))
    with pytest.raises(ValueError, match="limit"):
        fixed_batches(s, 5, limit=0)


# -- build_dataset -------------------------------------------------------------------------------------


def test_build_dataset_dispatch(tmp_path):
    ds = build_dataset(DataConfig(kind="facts", facts=FactsConfig(people=50)))
    assert isinstance(ds, FactsDataset) and ds.describe()["people"] == 50
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text(f"file {i} " * 20)
    ds = build_dataset(DataConfig(kind="text", text=TextConfig(paths=[str(tmp_path)], val_fraction=0.3)))
    assert isinstance(ds, TextDataset) and ds.describe()["files"] == 3
    with pytest.raises(ValueError, match="DataConfig.kind: unknown 'wiki'; choose one of facts, text"):
        build_dataset(DataConfig(kind="wiki"))
