"""Real text from local files, as UTF-8 bytes, packed into a training stream.

``TextConfig.paths`` may name files, directories (searched recursively, skipping hidden entries and
``__pycache__``) and glob patterns (``**`` allowed). Files found in directories or by globs are kept
if their extension is in ``extensions`` (an empty list keeps every file); files named explicitly are
always kept. Each non-empty file is one document, ``[bos] + bytes + [eos]`` with the ``ByteTokenizer``
(vocab 259), read as raw bytes (no decoding, so any encoding works).

The train/val split is deterministic, with ``n_val = round(val_fraction * files)``:

- ``val_fraction == 0``: no validation; every file trains (``val_batches`` returns []).
- ``n_val >= 1``: by file. Files are ranked by a SHA-1 hash of ``(seed, key)``, where the key is the
  path relative to the directory it was found under (or the path as given), and the first ``n_val``
  files are validation. Hashing makes the split independent of file order and stable when files are
  added elsewhere or the corpus is moved.
- ``n_val < 1`` (too few files, e.g. one): by position. The last ``round(val_fraction * bytes)`` bytes
  of every file are validation, the rest trains: the framed document ``[bos] + bytes + [eos]`` is cut
  in two, ``[bos] + head`` trains and ``tail + [eos]`` validates (a contiguous tail leaks less than
  random pieces would).

Training documents longer than ``chunk_tokens`` are cut into consecutive chunks of ``chunk_tokens``
tokens (the last may be shorter) and the packer permutes chunks each epoch, so a corpus of a few large
files is not read in the same order every epoch. Validation documents stay whole (their order is fixed).
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
    matches, e.g. [".py", ".txt", ".md"]; [] keeps all. val_fraction: share held out for validation, in
    [0, 1): 0 = no validation; whole files (hashed) when ``round(val_fraction * files) >= 1``, else the
    last ``val_fraction`` of every file's bytes. chunk_tokens: training documents are cut into chunks of
    this many tokens, shuffled per epoch (0 or null: whole files). tokenizer: "byte". seed: split and
    packing order.
    """

    paths: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py"])
    val_fraction: float = 0.05
    chunk_tokens: int | None = 4096
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
    """(train paths, val paths): the ``round(val_fraction * n)`` files with the smallest hash are val.

    Needs ``1 <= round(val_fraction * n) < n`` (``TextDataset`` splits inside the files below that).
    """
    n_val = round(val_fraction * len(files))
    if n_val < 1:
        raise ValueError(
            f"TextConfig.val_fraction={val_fraction} of {len(files)} file(s) rounds to no validation file; "
            "split_files needs round(val_fraction * files) >= 1"
        )
    if n_val >= len(files):
        raise ValueError(
            f"TextConfig.val_fraction={val_fraction} puts all {len(files)} files in validation, leaving no training "
            "files; lower val_fraction or add files"
        )
    ranked = sorted(files, key=lambda pk: (hashlib.sha1(f"{seed}:{pk[1]}".encode()).hexdigest(), pk[0]))
    val = sorted(path for path, _ in ranked[:n_val])
    train = sorted(path for path, _ in ranked[n_val:])
    return train, val


def split_tail(doc: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``doc`` = [bos] + bytes + [eos] (n + 2,) -> ([bos] + head, tail + [eos]), tail = the last
    ``round(val_fraction * n)`` bytes; either part may be just its special token."""
    n = len(doc) - 2
    cut = 1 + n - round(val_fraction * n)
    return doc[:cut], doc[cut:]


def chunk(docs: list[torch.Tensor], chunk_tokens: int | None) -> list[torch.Tensor]:
    """Each document cut into consecutive pieces of ``chunk_tokens`` tokens (the last may be shorter);
    ``chunk_tokens`` 0 or None: ``docs`` unchanged."""
    if not chunk_tokens:
        return list(docs)
    return [piece for d in docs for piece in torch.split(d, chunk_tokens)]


class TextDataset(PackedDataset):
    """Byte-level text corpus: same ``train_batch`` / ``val_batches`` / ``describe`` API as ``FactsDataset``.

    Attributes: cfg, tokenizer (ByteTokenizer), vocab_size (259), split ("files", "tail" or "none", see
    the module docstring), train_files / val_files (paths; with "tail" both are every file),
    val_documents (1-D int16 tensors: [bos] + bytes + [eos], or with "tail" each file's tail + [eos]),
    documents (the training chunks, 1-D int16 tensors of at most ``chunk_tokens`` tokens, in file order).
    """

    def __init__(self, cfg: TextConfig):
        if cfg.tokenizer not in TOKENIZERS:
            raise ValueError(f"TextConfig.tokenizer: unknown {cfg.tokenizer!r}; choose one of {TOKENIZERS}")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ValueError(
                f"TextConfig.val_fraction: must be in [0, 1), got {cfg.val_fraction}; use e.g. 0.05 "
                "(0 = no validation, every file trains)"
            )
        if cfg.chunk_tokens is not None and cfg.chunk_tokens < 0:
            raise ValueError(
                f"TextConfig.chunk_tokens: must be >= 0 or null, got {cfg.chunk_tokens}; use e.g. 4096 "
                "(0 or null = whole files)"
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
        if cfg.val_fraction == 0:
            self.split = "none"
            self.train_files, self.val_files = sorted(path for path, _ in nonempty), []
            train_docs, self.val_documents = [self._read(p) for p in self.train_files], []
        elif round(cfg.val_fraction * len(nonempty)) >= 1:
            self.split = "files"
            self.train_files, self.val_files = split_files(nonempty, cfg.val_fraction, cfg.seed)
            train_docs = [self._read(p) for p in self.train_files]
            self.val_documents = [self._read(p) for p in self.val_files]
        else:  # too few files to hold any out: hold out the tail of each
            self.split = "tail"
            self.train_files = self.val_files = sorted(path for path, _ in nonempty)
            parts = [split_tail(self._read(p), cfg.val_fraction) for p in self.train_files]
            train_docs = [head for head, _ in parts]
            self.val_documents = [tail for _, tail in parts]
            # (each head keeps a byte: here val_fraction * files <= 0.5, so a tail is at most half its file)
            if sum(len(d) - 1 for d in self.val_documents) == 0:
                raise ValueError(
                    f"TextConfig.val_fraction={cfg.val_fraction}: the corpus ({sum(sizes.values())} bytes) is too "
                    "small to hold out any byte; raise val_fraction, add text, or use val_fraction=0"
                )
        self.documents = chunk(train_docs, cfg.chunk_tokens)
        self.n_train_documents = len(train_docs)
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
            "split": self.split,
            "files": len(set(self.train_files) | set(self.val_files)),
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "documents": self.n_train_documents,
            "chunks": len(self.documents),
            "tokens_per_epoch": self.tokens_per_epoch,
            "val_tokens": sum(len(d) for d in self.val_documents),
            "vocab_size": self.vocab_size,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"TextDataset(train_files={d['train_files']}, val_files={d['val_files']}, tokens={d['tokens_per_epoch']})"
        )
