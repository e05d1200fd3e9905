"""Evaluation of a trained language model: loss, fact recall, held-out QA and memory usage.

``evaluate(model, dataset)`` returns one flat dict of floats:

    loss, ppl                      mean next-token loss (and its exp) on ``dataset.val_batches`` (facts:
                                   the training documents, in a fixed packing; text: held-out files or
                                   file tails); absent when there is no validation (text, val_fraction=0)
    recall/<format>                exact-match recall of the facts in a trained format (records, bios, qa),
    recall/<format>/<attribute>      over every person, and per attribute
    bits/<format>                  bits of those facts the model stores (``stored_bits``): how much less its
                                   predictions of the values cost than the values' frequencies alone
    qa_heldout, qa_heldout/<attr>  QA accuracy on the held-out people, whose QA pairs were never trained:
                                   the model must *extract* facts it only read in biographies
    memory/<block>/<stat>          usage statistics of each memory layer (``UsageTracker.summary``)

Recall is exact match under greedy decoding: the model is prompted with a probe's prefix (e.g.
``<bos> ada lovelace birth_city``) and must produce every token of the answer. It is computed
by teacher forcing: greedy decoding reproduces the answer iff at every answer position the argmax
of the logits, given the prompt and the previous answer tokens, is the next answer token. One
forward pass per probe, batched over probes of equal length (no padding, so nothing to mask).

The user's own facts: ``probe_recall(model, load_probes(path, tokenizer))`` reads a JSONL file of
``{"prompt": ..., "answer": ..., "attribute": ...}`` lines (attribute optional) and returns
``probes/recall`` and ``probes/recall/<attribute>``, the same exact-match greedy recall
(``memlayers eval RUN --probes FILE.jsonl``).
"""

import json
import math
import os
import random
from collections import defaultdict

import torch
from torch import nn


@torch.no_grad()
def probe_scores(model: nn.Module, probes: list, batch_size: int = 256, device=None):
    """-> (hits (P,) bool, nll (P,) float32): does greedy decoding from ``probe.prompt`` reproduce
    ``probe.answer`` exactly, and the answer's negative log-likelihood ``-log p(answer | prompt)`` in nats
    (summed over its tokens, teacher forced).

    Probes are grouped by ``len(prompt) + len(answer)`` and run as batches of equal-length rows.
    """
    device = device if device is not None else next(model.parameters()).device
    hits = torch.zeros(len(probes), dtype=torch.bool)
    nll = torch.zeros(len(probes))
    by_shape = defaultdict(list)
    for i, p in enumerate(probes):
        by_shape[(len(p.prompt), len(p.answer))].append(i)
    for (n_prompt, n_answer), ids in by_shape.items():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            rows = torch.tensor([probes[i].prompt + probes[i].answer for i in chunk], device=device)  # (b, S)
            logits = model(rows[:, :-1]).logits[:, n_prompt - 1 :].float()  # (b, n_answer, V): answer positions
            answer = rows[:, n_prompt:]  # (b, n_answer)
            hits[chunk] = (logits.argmax(-1) == answer).all(-1).cpu()
            nll[chunk] = -logits.log_softmax(-1).gather(-1, answer.unsqueeze(-1)).sum((1, 2)).cpu()
    return hits, nll


def probe_hits(model: nn.Module, probes: list, batch_size: int = 256, device=None) -> torch.Tensor:
    """(P,) bool: does greedy decoding from ``probe.prompt`` reproduce ``probe.answer`` exactly?"""
    return probe_scores(model, probes, batch_size, device)[0]


def stored_bits(probes: list, nll: torch.Tensor, total: int) -> float | None:
    """Bits of the probes' facts the model holds: ``sum(prior_bits - nll / ln 2)``, how many bits fewer its
    predictions of the answers cost than knowing only each attribute's value frequencies (negative for a
    model worse than that prior), scaled from the ``len(probes)`` scored to ``total`` (a sample's estimate).
    None without ``Probe.prior_bits``."""
    if not probes or any(p.prior_bits is None for p in probes):
        return None
    gain = sum(p.prior_bits for p in probes) - nll.double().sum().item() / math.log(2)
    return gain * total / len(probes)


def load_probes(path: str | os.PathLike, tokenizer) -> list:
    """The probes of a JSONL file, one ``{"prompt": str, "answer": str, "attribute": str}`` per line
    (attribute optional; blank lines skipped), encoded with ``tokenizer`` (the run's dataset's).

    Each is a ``memlayers.data.Probe`` with ``prompt`` = [bos] + encode(prompt), ``answer`` =
    encode(answer), ``person`` = its 1-based line number, ``attribute`` = the attribute or "".
    The byte tokenizer encodes the strings exactly, so ``prompt + answer`` must be the text the model
    should continue (put the separating space in one of them). Errors name the file and line.
    """
    from .data import Probe

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"probes file {path!r} does not exist")
    probes = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg}); each line must be an object like "
                    '{"prompt": "...", "answer": "..."}'
                ) from None
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a JSON object with keys prompt and answer, got {line.strip()!r}")
            missing = [k for k in ("prompt", "answer") if k not in item]
            if missing:
                raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; each line needs prompt and answer")
            attribute = item.get("attribute", "")
            for key, value in (("prompt", item["prompt"]), ("answer", item["answer"]), ("attribute", attribute)):
                if not isinstance(value, str):
                    raise ValueError(f"{where}: {key} must be a string, got {value!r}")
            try:
                prompt, answer = tokenizer.encode(item["prompt"]), tokenizer.encode(item["answer"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if not answer:
                raise ValueError(f"{where}: empty answer ({item['answer']!r} encodes to no token); give a real one")
            probes.append(Probe(n, attribute, [tokenizer.bos_id] + prompt, answer, heldout=False))
    if not probes:
        raise ValueError(f"probes file {path!r} holds no probe; write one JSON object per line")
    return probes


@torch.no_grad()
def probe_recall(model: nn.Module, probes: list, *, batch_size: int = 256, device=None) -> dict[str, float]:
    """Exact-match greedy recall of ``probes`` (from ``load_probes``): ``{"probes/recall": overall,
    "probes/recall/<attribute>": per attribute}`` (probes without an attribute count only overall)."""
    if not probes:
        return {}
    limit = model.config.max_seq_len
    for p in probes:
        if len(p.prompt) + len(p.answer) - 1 > limit:  # the forward reads prompt + answer but the last token
            raise ValueError(
                f"probe on line {p.person} is {len(p.prompt) + len(p.answer) - 1} tokens (prompt + answer - 1), "
                f"longer than the model's max_seq_len={limit}; shorten it"
            )
    was_training = model.training
    model.eval()
    try:
        hits = probe_hits(model, probes, batch_size=batch_size, device=device)
    finally:
        model.train(was_training)
    out = {"probes/recall": hits.float().mean().item()}
    by_attr = defaultdict(list)
    for p, h in zip(probes, hits.tolist()):
        if p.attribute:
            by_attr[p.attribute].append(h)
    out.update({f"probes/recall/{a}": sum(h) / len(h) for a, h in sorted(by_attr.items())})
    return out


def _recall(prefix: str, probes: list, hits: torch.Tensor) -> dict[str, float]:
    """``{prefix: mean hit rate, prefix/<attribute>: per attribute}`` (empty when there are no probes)."""
    if not probes:
        return {}
    out = {prefix: hits.float().mean().item()}
    by_attr = defaultdict(list)
    for p, h in zip(probes, hits.tolist()):
        by_attr[p.attribute].append(h)
    out.update({f"{prefix}/{a}": sum(h) / len(h) for a, h in sorted(by_attr.items())})
    return out


def _subsample(probes: list, limit: int | None) -> list:
    """At most ``limit`` probes, a fixed random sample (seeded; a stride could alias with the attributes)."""
    if limit is None or len(probes) <= limit:
        return probes
    return [probes[i] for i in sorted(random.Random(0).sample(range(len(probes)), limit))]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    seq_len: int = 128,
    val_rows: int = 256,
    device=None,
) -> dict[str, float]:
    """Evaluate ``model`` (a ``memlayers.model.Transformer``) on ``dataset`` (see the module docstring).

    limit: at most this many probes per format and per held-out set (None: all of them).
    batch_size, seq_len, val_rows: the validation loss is over the first ``val_rows`` sequences of
        ``dataset.val_batches`` (fixed), in batches of ``batch_size``.
    """
    was_training = model.training
    model.eval()
    try:
        device = device if device is not None else next(model.parameters()).device
        seq_len = min(seq_len, model.config.max_seq_len)
        total, count = 0.0, 0
        for x, y in dataset.val_batches(batch_size, seq_len, limit=val_rows):
            n = (y != -100).sum().item()
            total += model(x.to(device), y.to(device)).loss.item() * n  # weighted: the last batch may be smaller
            count += n
        out = {}
        if count:
            out["loss"] = total / count
            out["ppl"] = math.exp(min(out["loss"], 50.0))
        for fmt in dataset.probe_formats:  # the formats the model was trained on
            probes = dataset.probes(fmt)
            trained = [p for p in probes if not p.heldout]
            seen = _subsample(trained, limit)
            hits, nll = probe_scores(model, seen, device=device)
            out.update(_recall(f"recall/{fmt}", seen, hits))
            if (bits := stored_bits(seen, nll, len(trained))) is not None:
                out[f"bits/{fmt}"] = bits
            if fmt == "qa":  # QA of the held-out people: facts read only in biographies
                heldout = _subsample([p for p in probes if p.heldout], limit)
                out.update(_recall("qa_heldout", heldout, probe_hits(model, heldout, device=device)))
        for block, layer in model.memory_layers():
            if layer.usage is not None:
                out.update({f"memory/{block}/{k}": float(v) for k, v in layer.usage.summary().items()})
        return out
    finally:
        model.train(was_training)
