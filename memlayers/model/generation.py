"""Choosing the next token from logits: greedy, or temperature sampling with top-k and nucleus (top-p) filters.

Used by ``Transformer.generate``; usable on any (B, V) logits:

    token = sample_next(logits, temperature=0.8, top_k=50, top_p=0.95, generator=g)  # (B, V) -> (B,) int64
"""

import math

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One-line ValueErrors for settings ``sample_next`` cannot use."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise ValueError(f"generate: top_k must be an integer >= 1 (or None: no top-k filter), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be in (0, 1] (or None: no nucleus filter), got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> float32 (B, V) with every token outside the top-k / the nucleus set to -inf.

    top_k: keep the k largest logits (exactly k, ties broken by ``torch.topk``). top_p: keep the smallest
    set of most likely tokens whose softmax probability reaches top_p (always at least the most likely).
    """
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        values, ids = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, -math.inf).scatter_(-1, ids, values)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens ranked before it already reach top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,) int64.

    temperature 0: argmax (top_k/top_p unused). Else one draw from softmax(filter_logits(logits) /
    temperature) per row, with ``generator`` (on the logits' device) or torch's default one.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # the max first: with a tiny temperature the others become -inf, not inf - inf = nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    probs = filter_logits(logits, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
