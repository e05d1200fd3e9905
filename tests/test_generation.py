"""Decoding (Transformer.generate, memlayers.model.generation): the KV cache gives the uncached tokens and
logits (dense, MoE, memory layers with BatchNorm queries and a shared pool; across max_seq_len), sampling
(seeded, top-k, nucleus), early stop at eos, and argument errors."""

import math

import pytest
import torch
from conftest import rel_err

from memlayers.model import MemorySpec, ModelConfig, MoESpec, Transformer
from memlayers.model.generation import filter_logits, sample_next

V = 50
OPTIONS = {"n_keys": 8, "heads": 2, "topk": 4, "query_norm": "batchnorm"}
VARIANTS = {
    "dense": {},
    "moe": {"moe": MoESpec(layers="1,3", experts=4, topk=2, hidden=16)},
    "memory": {"memories": [MemorySpec(layers="1", pool="p", options=OPTIONS),
                            MemorySpec(layers="3", pool="p", mode="beside", options=OPTIONS)]},  # fmt: skip
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only cost


def model_for(variant: str, max_seq_len: int = 16) -> Transformer:
    # Untied and a wide init: varied, context-dependent greedy text (a tied head at init repeats the last token)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=4, n_heads=2, max_seq_len=max_seq_len, tie_embeddings=False,
                      init_std=0.1, **VARIANTS[variant])  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():  # training-mode forwards: BatchNorm running stats that are not the identity
        for _ in range(3):
            model(tokens(4, max_seq_len, seed=9))
    return model.eval()


def tokens(B=2, T=5, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B, T, new", [(2, 1, 10), (3, 5, 10), (2, 5, 14)])  # the last crosses max_seq_len=8
def test_cached_greedy_equals_uncached(variant, B, T, new):
    model = model_for(variant, max_seq_len=8)
    idx = tokens(B, T)
    cached = model.generate(idx, new)
    assert cached.shape == (B, T + new) and torch.equal(cached[:, :T], idx)
    assert torch.equal(cached, model.generate(idx, new, use_cache=False))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_one_forward(variant):
    """Chunks of 5, 1 and 6 tokens through one cache give the logits of a single forward (fp32)."""
    model = model_for(variant)
    idx = tokens(2, 12)
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache()
        parts = [model(idx[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 12))]
    assert cache[0].length == 12
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


def test_cache_errors():
    model = model_for("dense", max_seq_len=8)
    cache = model.new_cache()
    model(tokens(2, 6), cache=cache)
    with pytest.raises(ValueError, match="6 cached \\+ 3 new tokens > max_seq_len=8"):
        model(tokens(2, 3), cache=cache)
    with pytest.raises(ValueError, match="batch size 3, but the cache holds 2 rows"):
        model(tokens(3, 1), cache=cache)
    with pytest.raises(ValueError, match="cache has 1 layers, the model 4"):
        model(tokens(2, 1), cache=cache[:1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_is_reproducible_with_a_seeded_generator(variant):
    model = model_for(variant, max_seq_len=8)
    idx = tokens(2, 3)

    def sample(seed, **kw):
        return model.generate(idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    a = sample(1)
    assert torch.equal(a, sample(1)) and torch.equal(a, sample(1, use_cache=False))
    assert not torch.equal(a, sample(2))
    assert not torch.equal(a, model.generate(idx, 12))  # it really sampled


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = model_for("memory", max_seq_len=8)
    idx = tokens(2, 3)
    greedy = model.generate(idx, 10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(idx, 10, temperature=2.0, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(idx, 10, temperature=2.0, top_p=1e-6, generator=g), greedy)


def test_filter_logits_and_sample_frequencies():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    finite = lambda **kw: filter_logits(logits, **kw).isfinite()[0].tolist()  # noqa: E731
    assert finite(top_k=2) == [True, True, False, False]
    assert finite(top_k=9) == finite() == [True] * 4
    assert finite(top_p=0.5) == [True, False, False, False]
    assert finite(top_p=0.75) == [True, True, False, False]
    assert finite(top_p=0.85) == [True, True, True, False]
    assert finite(top_k=2, top_p=0.9) == [True, True, False, False]
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(20000, 4), 1.0, generator=g)
    assert torch.bincount(draws, minlength=4).div(20000).sub(probs[0]).abs().max() < 0.015
    draws = sample_next(logits.expand(20000, 4), 1.0, top_k=2, generator=g)
    assert abs(draws.eq(0).float().mean().item() - 0.5 / 0.8) < 0.015 and draws.max() == 1
    assert torch.equal(sample_next(logits, 0.0), torch.tensor([0]))


def test_stops_when_every_row_has_produced_eos():
    model = model_for("dense", max_seq_len=8)
    idx = tokens(2, 4)
    free = model.generate(idx, 12)[:, 4:]

    def first(row, eos):
        hits = (free[row] == eos).nonzero()
        return hits[0].item() if len(hits) else None

    # an eos both rows produce, at different steps: the first row to finish is padded, then both stop
    firsts = {e: [first(0, e), first(1, e)] for e in free[1].tolist()}
    eos = next(e for e, (a, b) in firsts.items() if a is not None and a != b)
    firsts = firsts[eos]
    out = model.generate(idx, 12, eos_id=eos)
    assert out.shape == (2, 4 + max(firsts) + 1)
    for row, f in enumerate(firsts):
        assert torch.equal(out[row, : 4 + f + 1], torch.cat((idx[row], free[row, : f + 1])))
        assert (out[row, 4 + f :] == eos).all()
    eos = int(free[0, 2])
    single = model.generate(idx[:1], 12, eos_id=eos)
    assert single.shape[1] == 4 + first(0, eos) + 1 < 16 and single[0, -1] == eos


def test_generate_restores_training_mode_and_keeps_int32():
    model = model_for("memory", max_seq_len=8).train()
    out = model.generate(tokens(2, 3).int(), 4)
    assert model.training and out.dtype == torch.int32 and out.shape == (2, 7)
    assert torch.equal(model.generate(tokens(2, 3), 0), tokens(2, 3))


@pytest.mark.parametrize(
    "kw, match",
    [({"max_new_tokens": -1}, "max_new_tokens must be >= 0"), ({"temperature": -0.1}, "temperature must be"),
     ({"temperature": math.nan}, "temperature must be"), ({"top_k": 0}, "top_k must be an integer >= 1"),
     ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"), ({"top_p": 1.5}, "top_p must be in"),
     ({"eos_id": V}, "eos_id must be in \\[0, vocab_size=50\\)")],
)  # fmt: skip
def test_argument_errors(kw, match):
    model = model_for("dense")
    kw = {"max_new_tokens": 3, **kw}
    with pytest.raises(ValueError, match=match):
        model.generate(tokens(), **kw)


def test_a_tiny_temperature_is_greedy_not_nan():
    from memlayers.model.generation import sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    assert sample_next(logits, temperature=1e-40).tolist() == [1, 0]
