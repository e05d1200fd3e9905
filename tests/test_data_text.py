"""TextDataset over local files: discovery, errors, the by-file and by-tail splits, no validation, chunks."""

import json
import os
from pathlib import Path

import pytest
import torch

from memlayers.data import TextConfig, TextDataset
from memlayers.data.text import find_files
from memlayers.evaluate import evaluate
from memlayers.model import ModelConfig, Transformer


def _corpus(root):
    files = {
        "a/x.py": "def f(x):\n    return x + 1\n",
        "a/b/y.txt": "héllo wörld\n" * 5,
        "c.md": "# title\n\nsome text\n",
        "d/e/f/g.txt": "deep file\n",
        "z.bin": "\x00\x01binary",  # filtered by extension
        ".hidden/h.txt": "hidden",  # hidden directory: skipped
        "a/__pycache__/m.py": "cached",  # skipped
        "empty.txt": "",  # empty: dropped
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return files


def test_directory_discovery_and_documents(tmp_path):
    files = _corpus(tmp_path)
    ds = TextDataset(TextConfig(paths=[str(tmp_path)], val_fraction=0.25))
    rel = sorted(os.path.relpath(p, tmp_path) for p in ds.train_files + ds.val_files)
    assert rel == sorted(["a/x.py", "a/b/y.txt", "c.md", "d/e/f/g.txt"])
    assert len(ds.val_files) == 1 and not set(ds.train_files) & set(ds.val_files)
    tok = ds.tokenizer
    assert ds.vocab_size == 259
    for path, doc in zip(ds.train_files + ds.val_files, ds.documents + ds.val_documents):
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id and doc.dtype == torch.int16  # 2 bytes a token
        assert tok.decode(doc.tolist()) == files[os.path.relpath(path, tmp_path)]
    d = ds.describe()
    assert d["files"] == 4 and d["train_files"] == 3 and d["val_files"] == 1
    assert d["tokens_per_epoch"] == sum(len(doc) for doc in ds.documents)
    assert ds.probes("records") == [] and ds.probe_formats == []
    # no extension filter: z.bin comes in, hidden and __pycache__ still skipped
    everything = find_files(TextConfig(paths=[str(tmp_path)], extensions=[]))
    assert sorted(k for _, k in everything) == sorted(
        ["a/x.py", "a/b/y.txt", "c.md", "d/e/f/g.txt", "z.bin", "empty.txt"]
    )


def test_globs_and_explicit_files(tmp_path):
    _corpus(tmp_path)
    found = find_files(TextConfig(paths=[str(tmp_path / "**" / "*.txt")]))
    assert sorted(os.path.basename(p) for p, _ in found) == ["empty.txt", "g.txt", "y.txt"]
    # an explicit file is kept whatever its extension; duplicates are merged
    found = find_files(TextConfig(paths=[str(tmp_path / "z.bin"), str(tmp_path / "c.md"), str(tmp_path)]))
    assert sorted(os.path.basename(p) for p, _ in found) == ["c.md", "empty.txt", "g.txt", "x.py", "y.txt", "z.bin"]
    # extensions without the dot are accepted
    found = find_files(TextConfig(paths=[str(tmp_path)], extensions=["py"]))
    assert [k for _, k in found] == ["a/x.py"]


def test_split_is_deterministic_and_seeded(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file number {i}\n")
    split = lambda seed: TextDataset(TextConfig(paths=[str(tmp_path)], val_fraction=0.2, seed=seed))
    a, b, c = split(0), split(0), split(1)
    assert a.val_files == b.val_files and len(a.val_files) == 8 and len(a.train_files) == 32
    assert a.val_files != c.val_files
    assert a.val_files != sorted(a.val_files + a.train_files)[:8]  # hashed, not the first files
    # the split key is the path relative to the root: moving the corpus keeps the split
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    os.rename(tmp_path, moved)
    m = TextDataset(TextConfig(paths=[str(moved)], val_fraction=0.2))
    assert [os.path.basename(p) for p in m.val_files] == [os.path.basename(p) for p in a.val_files]


def test_errors(tmp_path):
    _corpus(tmp_path)
    (tmp_path / "tiny.bin").write_text("x")  # one byte (.bin: not in the directory): no tail to hold out
    cases = [
        (TextConfig(paths=[]), "non-empty list"),
        (TextConfig(paths=[str(tmp_path / "nope")]), "does not exist"),
        (TextConfig(paths=[str(tmp_path / "*.nothing")]), "matched nothing"),
        (TextConfig(paths=[str(tmp_path / "*")], extensions=[".rst"]), r"no file with an extension in \['.rst'\]"),
        (TextConfig(paths=[str(tmp_path)], extensions=[".rst"]), "holds no file"),
        (TextConfig(paths=[str(tmp_path / "empty.txt")]), "corpus is empty"),
        (TextConfig(paths=[str(tmp_path)], val_fraction=-0.1), r"val_fraction: must be in \[0, 1\), got -0.1"),
        (TextConfig(paths=[str(tmp_path)], val_fraction=1.0), r"val_fraction: must be in \[0, 1\), got 1.0"),
        (TextConfig(paths=[str(tmp_path)], val_fraction=float("nan")), r"val_fraction: must be in \[0, 1\)"),
        (TextConfig(paths=[str(tmp_path)], val_fraction=0.9), "no training files; lower val_fraction"),
        (TextConfig(paths=[str(tmp_path)], chunk_tokens=-1), "chunk_tokens: must be >= 0 or null, got -1"),
        (TextConfig(paths=[str(tmp_path / "tiny.bin")], val_fraction=0.1), "too small to hold out any byte"),
        (TextConfig(paths=[str(tmp_path)], tokenizer="bpe"), "unknown 'bpe'"),
    ]
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            TextDataset(cfg)


def test_stdlib_json_package_as_a_real_corpus():
    root = os.path.dirname(json.__file__)
    expected = sorted(f for f in os.listdir(root) if f.endswith(".py") and os.path.getsize(os.path.join(root, f)))
    cfg = TextConfig(paths=[root], extensions=[".py"], val_fraction=0.2, seed=0)
    ds = TextDataset(cfg)
    assert sorted(os.path.basename(p) for p in ds.train_files + ds.val_files) == expected
    assert len(ds.val_files) == max(1, round(0.2 * len(expected)))
    x, y = ds.train_batch(3, batch_size=4, seq_len=64)
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 259
    again = TextDataset(cfg).train_batch(3, batch_size=4, seq_len=64)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    text = ds.tokenizer.decode(ds.stream(64).epoch_tokens(0).tolist())
    assert "import" in text and "def " in text
    val = ds.val_batches(batch_size=8, seq_len=64, limit=10)
    assert [v[0].shape[0] for v in val] == [8, 2]
    val_text = ds.tokenizer.decode(torch.cat([v[0] for v in val]).reshape(-1).tolist())
    val_sources = "".join(Path(p).read_text(encoding="utf-8") for p in ds.val_files)
    assert val_text[200:260] in val_sources  # validation rows come from the validation files
    full = ds.val_batches(batch_size=8, seq_len=64)
    assert sum(v[0].shape[0] for v in full) == -(-sum(len(d) for d in ds.val_documents) // 64)


def _big_file(path, n=5000):
    text = "".join(f"line {i:05d}: the quick brown fox\n" for i in range(n // 32 + 1))[:n]
    path.write_text(text)
    return text.encode()


@pytest.mark.parametrize("val_fraction", [0.1, 0.25])
def test_one_file_holds_out_its_tail(tmp_path, val_fraction):
    data = _big_file(tmp_path / "one.txt")
    cfg = TextConfig(paths=[str(tmp_path / "one.txt")], val_fraction=val_fraction, chunk_tokens=0)
    ds = TextDataset(cfg)
    tok = ds.tokenizer
    assert ds.split == "tail" and ds.train_files == ds.val_files == [str(tmp_path / "one.txt")]
    (head,), (tail,) = ds.documents, ds.val_documents
    cut = len(data) - round(val_fraction * len(data))
    assert head.tolist() == [tok.bos_id] + list(data[:cut])  # [bos] + head trains
    assert tail.tolist() == list(data[cut:]) + [tok.eos_id]  # tail + [eos] validates: every token once
    d = ds.describe()
    assert d["split"] == "tail" and d["files"] == 1 and d["val_tokens"] == len(data) - cut + 1
    x, y = ds.train_batch(0, batch_size=4, seq_len=32)
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    val = ds.val_batches(batch_size=8, seq_len=32)
    assert sum(int((v[1] != -100).sum()) for v in val) == len(tail) - 1  # one epoch of the tail stream
    assert bytes(int(t) for t in torch.cat([v[0] for v in val]).reshape(-1)[:100]) == data[cut : cut + 100]


def test_too_few_files_split_every_file_by_tail(tmp_path):
    for i in range(3):  # round(0.1 * 3) = 0 files: hold out the tail of each instead
        _big_file(tmp_path / f"f{i}.txt", n=1000 + i)
    ds = TextDataset(TextConfig(paths=[str(tmp_path)], val_fraction=0.1, chunk_tokens=0))
    assert ds.split == "tail" and len(ds.documents) == len(ds.val_documents) == 3
    assert [len(t) - 1 for t in ds.val_documents] == [100, 100, 100]  # round(0.1 * 1000..1002) bytes each
    # enough files: the hashed by-file split, as before
    many = TextDataset(TextConfig(paths=[str(tmp_path)], val_fraction=0.34, chunk_tokens=0))
    assert many.split == "files" and len(many.val_files) == 1 and len(many.train_files) == 2


def test_val_fraction_zero_trains_on_everything(tmp_path):
    files = _corpus(tmp_path)
    ds = TextDataset(TextConfig(paths=[str(tmp_path)], val_fraction=0.0))
    assert ds.split == "none" and ds.val_files == [] and ds.val_documents == []
    assert sorted(os.path.relpath(p, tmp_path) for p in ds.train_files) == sorted(
        k for k, v in files.items() if v and k.endswith((".txt", ".md", ".py")) and "/." not in "/" + k
        and "__pycache__" not in k
    )
    assert ds.val_batches(batch_size=4, seq_len=16) == [] and ds.val_batches(4, 16, limit=3) == []
    assert ds.describe()["val_files"] == 0 and ds.describe()["val_tokens"] == 0
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=259, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    assert "loss" not in evaluate(model, ds, batch_size=4, seq_len=16)  # no validation: no loss, no crash


def test_val_fraction_zero_in_a_training_run(tmp_path):
    from memlayers.train import load_config, train

    _big_file(tmp_path / "one.txt", n=3000)
    tiny = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "data.kind=text",
            f"data.text.paths=[{tmp_path / 'one.txt'}]", "data.text.val_fraction=0", "data.text.chunk_tokens=256",
            "train.steps=4", "train.batch_size=2", "train.seq_len=32", "train.warmup=1", "train.eval_every=2",
            "train.log_every=1", "train.threads=1", "train.progress=false"]  # fmt: skip
    result = train(load_config(None, tiny), tmp_path / "run")
    assert result["steps"] == 4 and result["final_loss"] > 0
    assert "loss" not in result["eval"] and "ppl" not in result["eval"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # the periodic eval at step 2 did not crash
    assert not any(k in r for r in lines for k in ("eval/loss", "eval/ppl"))


def test_chunks_are_shuffled_each_epoch(tmp_path):
    data = _big_file(tmp_path / "one.txt", n=5000)
    cfg = TextConfig(paths=[str(tmp_path / "one.txt")], val_fraction=0.1, chunk_tokens=500)
    ds = TextDataset(cfg)
    head = [ds.tokenizer.bos_id] + list(data[: len(data) - 500])
    assert [len(c) for c in ds.documents] == [500] * 9 + [1]  # 4501 training tokens in chunks of 500
    assert torch.cat(ds.documents).tolist() == head  # the chunks tile the training part, in order
    assert ds.describe()["documents"] == 1 and ds.describe()["chunks"] == 10
    stream = ds.stream(64)
    orders = [stream.epoch_order(e).tolist() for e in range(3)]
    assert len({tuple(o) for o in orders}) == 3  # a new chunk order each epoch
    for e, order in enumerate(orders):
        tokens = stream.epoch_tokens(e).tolist()
        assert tokens == [t for i in order for t in ds.documents[i].tolist()]
    assert len(ds.val_documents) == 1 and len(ds.val_documents[0]) == 501  # validation stays whole
    # whole files (chunk_tokens 0 or null): one document, the same order every epoch
    for whole in (0, None):
        w = TextDataset(TextConfig(paths=[str(tmp_path / "one.txt")], val_fraction=0.1, chunk_tokens=whole))
        assert len(w.documents) == 1 and torch.equal(w.stream(64).epoch_tokens(0), w.stream(64).epoch_tokens(1))


def test_same_config_same_batches(tmp_path):
    for i in range(3):
        _big_file(tmp_path / f"f{i}.txt", n=2000 + 7 * i)
    for val_fraction in (0.0, 0.1, 0.34):  # none, tail, files
        cfg = TextConfig(paths=[str(tmp_path)], val_fraction=val_fraction, chunk_tokens=300, seed=3)
        a, b = TextDataset(cfg), TextDataset(cfg)
        for step in (0, 5, 40):  # 40 * 4 * 32 tokens: past the first epoch
            assert all(torch.equal(u, v) for u, v in zip(a.train_batch(step, 4, 32), b.train_batch(step, 4, 32)))
        va, vb = a.val_batches(4, 32), b.val_batches(4, 32)
        assert len(va) == len(vb) and all(torch.equal(u, v) for p, q in zip(va, vb) for u, v in zip(p, q))
        other = TextDataset(TextConfig(paths=[str(tmp_path)], val_fraction=val_fraction, chunk_tokens=300, seed=4))
        assert not torch.equal(a.train_batch(0, 4, 32)[0], other.train_batch(0, 4, 32)[0])  # the seed matters
