"""A memlayers checkpoint as an lm-evaluation-harness model: run any local lm-eval task on it.

    from memlayers.integrations.lmeval import MemlayersLM, evaluate_tasks
    results = evaluate_tasks("runs/a", ["my_task"], include_path="my_tasks/")   # lm_eval.simple_evaluate

or ``memlayers lm-eval runs/a --tasks my_task --include-path my_tasks/``. Importing this module registers the
model with lm-eval as ``memlayers`` (``model_args="checkpoint=runs/a"``).

``MemlayersLM`` answers lm-eval's three requests with the checkpoint's own model and tokenizer (facts runs: the
world's word vocabulary, where a word outside it is an error naming it; text runs: bytes):

* ``loglikelihood(context, continuation)``: log p(continuation | bos + context), summed over the continuation's
  tokens, and whether greedy decoding would produce it; the context is cut from the left to ``max_seq_len``;
* ``loglikelihood_rolling(text)``: log p(text | bos) over lm-eval's disjoint rolling windows of ``max_seq_len``
  tokens (every token predicted once; a window after the first starts from the one token before it);
* ``generate_until(context, {"until", "max_gen_toks", "temperature", ...})``: decoding with the KV cache
  (``Transformer.generate``; greedy unless ``do_sample`` with ``temperature`` > 0), cut at the first stop string.

Scoring runs in batches of equal length (no padding); so does generation: requests with prompts of one length
and the same length and temperature decode together (greedy: the tokens of one request at a time, up to float
rounding in near-ties; sampled: other draws). ``batch_size="auto"`` (lm-eval's ``--batch_size auto``) is the
default 16 (at most ``max_batch_size``): nothing is probed. One process.
"""

from .._extras import require

lm_eval = require("lm_eval", "lmeval")

import torch  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from ..data import build_tokenizer  # noqa: E402
from ..generate_cli import encode_prompt  # noqa: E402


@register_model("memlayers")
class MemlayersLM(LM):
    """checkpoint: a run directory, checkpoint file or exported .safetensors file; device; batch_size: rows per
    forward (or "auto", "auto:N": the default, at most ``max_batch_size``); max_gen_toks: the default generation
    length when a request gives none."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int | str = 16, max_gen_toks: int = 64,
                 max_batch_size: int | None = None):  # fmt: skip
        super().__init__()
        from ..train import load_checkpoint
        from ..train.trainer import resolve_device

        self._device = resolve_device(str(device), "device")
        self.config, self.model, _ = load_checkpoint(checkpoint, device=self._device)
        self.model.eval()
        self.tokenizer = build_tokenizer(self.config.data)
        if str(batch_size).split(":")[0] == "auto":
            batch_size = min(16, int(max_batch_size or 16))
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"MemlayersLM: batch_size must be a whole number >= 1 or 'auto', got {batch_size!r}")
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.max_length = self.model.config.max_seq_len

    @property
    def device(self):
        return self._device

    def _encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)[1:]  # the vocabulary check, without bos

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(tokens, n): the log-likelihood of the last n tokens given the ones before, and whether each is the
        argmax; rows of equal length run as one batch."""
        out: list = [None] * len(rows)
        by_length: dict = {}
        for i, (tokens, _) in enumerate(rows):
            by_length.setdefault(len(tokens), []).append(i)
        for length, ids in by_length.items():
            for start in range(0, len(ids), self.batch_size):
                chunk = ids[start : start + self.batch_size]
                x = torch.tensor([rows[i][0] for i in chunk], device=self._device)
                logp = self.model(x[:, :-1]).logits.float().log_softmax(-1)  # (b, length - 1, V)
                for row, i in enumerate(chunk):
                    n = rows[i][1]
                    target = x[row, length - n :]
                    pred = logp[row, length - 1 - n :]
                    out[i] = (pred.gather(-1, target[:, None]).sum().item(), bool((pred.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for context, continuation in (r.args for r in requests):
            prefix = [self.tokenizer.bos_id] + self._encode(context)
            target = self._encode(continuation)
            whole, n = prefix + target, len(target)
            if n > self.max_length:
                raise ValueError(
                    f"lm-eval: a continuation of {n} tokens does not fit the model's max_seq_len={self.max_length}"
                )
            rows.append((whole[-(self.max_length + 1) :], n))
        return self._score(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(
                self._encode(text), prefix_token=self.tokenizer.bos_id, max_seq_len=self.max_length, context_len=1
            )
            rows = [(context + target, len(target)) for context, target in map(make_disjoint_window, windows)]
            results.append(sum(logp for logp, _ in self._score(rows)))
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list = [None] * len(requests)
        groups: dict = {}  # (prompt length, max_new, temperature) -> [(request index, prompt, stop strings)]
        for i, (context, kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = encode_prompt(self.tokenizer, context)[-self.max_length :]
            groups.setdefault((len(prompt), max_new, temperature), []).append((i, prompt, until))
        eos = self.tokenizer.eos_id
        for (length, max_new, temperature), items in groups.items():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                x = torch.tensor([prompt for _, prompt, _ in chunk], device=self._device)
                new = self.model.generate(x, max_new, temperature=temperature, eos_id=eos)[:, length:].tolist()
                for (i, _, until), tokens in zip(chunk, new):
                    text = self.tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens)
                    cut = [text.find(stop) for stop in until if stop and stop in text]
                    results[i] = text[: min(cut)] if cut else text
        return results


def evaluate_tasks(checkpoint: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                   device: str = "cpu", batch_size: int = 16, **kwargs) -> dict:  # fmt: skip
    """``lm_eval.simple_evaluate`` of the checkpoint on ``tasks`` (with tasks defined in the YAML files under
    ``include_path``; ``limit`` examples per task); kwargs go to ``simple_evaluate``. Returns its results dict."""
    from lm_eval.tasks import TaskManager

    # your tasks alone first: indexing lm-eval's thousands of task files takes tens of seconds
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"lm-eval: unknown task(s) {', '.join(map(repr, unknown))}"
            + (f" (not in lm-eval nor in {include_path})" if include_path else "; give --include-path for your own")
        )
    model = MemlayersLM(checkpoint, device=device, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit, **kwargs)


__all__ = ["MemlayersLM", "evaluate_tasks"]
