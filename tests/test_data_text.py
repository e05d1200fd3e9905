"""TextDataset over local files: discovery, errors, the by-file split, byte documents."""

import json
import os
from pathlib import Path

import pytest
import torch

from memlayers.data import TextConfig, TextDataset
from memlayers.data.text import find_files


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
    cases = [
        (TextConfig(paths=[]), "non-empty list"),
        (TextConfig(paths=[str(tmp_path / "nope")]), "does not exist"),
        (TextConfig(paths=[str(tmp_path / "*.nothing")]), "matched nothing"),
        (TextConfig(paths=[str(tmp_path / "*")], extensions=[".rst"]), r"no file with an extension in \['.rst'\]"),
        (TextConfig(paths=[str(tmp_path)], extensions=[".rst"]), "holds no file"),
        (TextConfig(paths=[str(tmp_path / "empty.txt")]), "corpus is empty"),
        (TextConfig(paths=[str(tmp_path / "c.md")]), "at least 2 non-empty files"),
        (TextConfig(paths=[str(tmp_path)], val_fraction=0.0), r"val_fraction: must be in \(0, 1\)"),
        (TextConfig(paths=[str(tmp_path)], val_fraction=1.0), r"val_fraction: must be in \(0, 1\)"),
        (TextConfig(paths=[str(tmp_path)], val_fraction=0.9), "no training files; lower val_fraction"),
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
