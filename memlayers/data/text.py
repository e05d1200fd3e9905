"""Real text from local files, as UTF-8 bytes, packed into a training stream.

``TextConfig.paths`` may name files, directories (searched recursively, skipping hidden entries and
``__pycache__``) and glob patterns (``**`` allowed). Files found in directories or by globs are kept
if their extension is in ``extensions`` (an empty list keeps every file); files named explicitly are
always kept. Each non-empty file is one document, ``[bos] + bytes + [eos]`` with the ``ByteTokenizer``
(vocab 259), read as raw bytes (no decoding, so any encoding works).

The train/val split is by file and deterministic: files are ranked by a SHA-1 hash of
``(seed, key)``, where the key is the path relative to the directory it was found under (or the path
as given), and the first ``max(1, round(val_fraction * files))`` files are validation. Hashing makes
the split independent of file order and stable when files are added elsewhere or the corpus is moved.
"""

import glob
import hashlib
import os
from dataclasses import dataclass, field

import torch

from .packing import PackedDataset
from .tokenizers import ByteTokenizer

TOKENIZERS = ("byte",)


@dataclass
class TextConfig:
    """A corpus of local text files (see the module docstring).

    paths: files, directories (recursive) and globs. extensions: kept suffixes for directory/glob
    matches, e.g. [".py", ".txt", ".md"]; [] keeps all. val_fraction: share of files held out for
    validation, in (0, 1). tokenizer: "byte". seed: split and packing order.
    """

    paths: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py"])
    val_fraction: float = 0.05
    tokenizer: str = "byte"
    seed: int = 0


def _keep(path: str, extensions: list[str]) -> bool:
    return not extensions or os.path.splitext(path)[1].lower() in extensions


def _walk(root: str, extensions: list[str]) -> list[tuple[str, str]]:
    """(path, key) of the kept files under ``root``, key = path relative to ``root`` with '/' separators."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and _keep(name, extensions) and os.path.isfile(path):
                out.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    return out


def find_files(cfg: TextConfig) -> list[tuple[str, str]]:
    """The corpus files as sorted, de-duplicated (path, split key) pairs; clear errors for bad paths."""
    paths = [cfg.paths] if isinstance(cfg.paths, str) else list(cfg.paths)
    if not paths:
        raise ValueError(
            f"TextConfig.paths: need a non-empty list of files, directories or globs, got {cfg.paths!r}; "
            "e.g. data.text.paths=[corpus/]"
        )
    extensions = [e.lower() if e.startswith(".") else "." + e.lower() for e in cfg.extensions]
    found: list[tuple[str, str]] = []
    for p in paths:
        p = os.path.expanduser(str(p))
        if glob.has_magic(p):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise ValueError(f"TextConfig.paths: glob {p!r} matched nothing; check the pattern")
            hits = []
            for m in matches:
                if os.path.isdir(m):
                    hits += _walk(m, extensions)
                elif _keep(m, extensions):
                    hits.append((m, m.replace(os.sep, "/")))
            if not hits:
                raise ValueError(
                    f"TextConfig.paths: glob {p!r} matched {len(matches)} path(s) but no file with an extension in "
                    f"{extensions}; change TextConfig.extensions ([] keeps every file)"
                )
            found += hits
        elif os.path.isdir(p):
            hits = _walk(p, extensions)
            if not hits:
                raise ValueError(
                    f"TextConfig.paths: directory {p!r} holds no file with an extension in {extensions}; "
                    "change TextConfig.extensions ([] keeps every file)"
                )
            found += hits
        elif os.path.isfile(p):
            found.append((p, os.path.basename(p)))
        else:
            raise ValueError(f"TextConfig.paths: {p!r} does not exist (not a file, directory or matching glob)")
    unique: dict[str, tuple[str, str]] = {}
    for path, key in found:
        unique.setdefault(os.path.realpath(path), (path, key))
    return sorted(unique.values(), key=lambda pk: (pk[1], pk[0]))


def split_files(files: list[tuple[str, str]], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train paths, val paths): the ``max(1, round(val_fraction * n))`` files with the smallest hash are val."""
    if len(files) < 2:
        raise ValueError(
            f"TextConfig: the train/val split is by file and needs at least 2 non-empty files, found {len(files)}; "
            "add files (or split a single large file into several)"
        )
    n_val = max(1, round(val_fraction * len(files)))
    if n_val >= len(files):
        raise ValueError(
            f"TextConfig.val_fraction={val_fraction} puts all {len(files)} files in validation, leaving no training "
            "files; lower val_fraction or add files"
        )
    ranked = sorted(files, key=lambda pk: (hashlib.sha1(f"{seed}:{pk[1]}".encode()).hexdigest(), pk[0]))
    val = sorted(path for path, _ in ranked[:n_val])
    train = sorted(path for path, _ in ranked[n_val:])
    return train, val


class TextDataset(PackedDataset):
    """Byte-level text corpus: same ``train_batch`` / ``val_batches`` / ``describe`` API as ``FactsDataset``.

    Attributes: cfg, tokenizer (ByteTokenizer), vocab_size (259), train_files / val_files (paths),
    documents / val_documents (1-D int16 tensors, [bos] + bytes + [eos]).
    """

    def __init__(self, cfg: TextConfig):
        if cfg.tokenizer not in TOKENIZERS:
            raise ValueError(f"TextConfig.tokenizer: unknown {cfg.tokenizer!r}; choose one of {TOKENIZERS}")
        if not 0.0 < cfg.val_fraction < 1.0:
            raise ValueError(
                f"TextConfig.val_fraction: must be in (0, 1), got {cfg.val_fraction}; use e.g. 0.05 "
                "(validation needs at least one file)"
            )
        self.cfg = cfg
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        files = find_files(cfg)
        sizes = {path: os.path.getsize(path) for path, _ in files}
        nonempty = [(path, key) for path, key in files if sizes[path] > 0]
        if not nonempty:
            raise ValueError(
                f"TextConfig.paths: the corpus is empty ({len(files)} file(s) found, all empty); point paths at text"
            )
        self.train_files, self.val_files = split_files(nonempty, cfg.val_fraction, cfg.seed)
        self.documents = [self._read(p) for p in self.train_files]
        self.val_documents = [self._read(p) for p in self.val_files]
        self.seed = self.val_seed = cfg.seed
        self.tokens_per_epoch = sum(len(d) for d in self.documents)

    def _read(self, path: str) -> torch.Tensor:
        with open(path, "rb") as f:
            data = f.read()
        body = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16)  # ids < 259: int16 suffices
        bos, eos = (torch.tensor([t], dtype=torch.int16) for t in (self.tokenizer.bos_id, self.tokenizer.eos_id))
        return torch.cat([bos, body, eos])

    @property
    def probe_formats(self) -> list[str]:
        return []

    def probes(self, format: str) -> list:
        """Text has no recall probes: always []."""
        return []

    def describe(self) -> dict:
        return {
            "kind": "text",
            "files": len(self.train_files) + len(self.val_files),
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "documents": len(self.documents),
            "tokens_per_epoch": self.tokens_per_epoch,
            "val_tokens": sum(len(d) for d in self.val_documents),
            "vocab_size": self.vocab_size,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"TextDataset(train_files={d['train_files']}, val_files={d['val_files']}, tokens={d['tokens_per_epoch']})"
        )
