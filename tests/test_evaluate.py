"""memlayers.evaluate: teacher-forced exact match equals greedy generation, per-format/attribute recall,
held-out QA, the bits of the facts a model stores, and a model trained to memorise a tiny set of facts recalls
all of them."""

import math

import pytest
import torch

from memlayers.data import DataConfig, build_dataset
from memlayers.data.facts import ATTRIBUTES, FactsConfig
from memlayers.evaluate import evaluate, probe_hits, probe_scores, stored_bits
from memlayers.model import MemorySpec, ModelConfig, Transformer
from memlayers.optim import build_optimizer


def tiny_model(dataset, seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(dim=32, n_layers=2, n_heads=2, max_seq_len=48) | kw
    return Transformer(ModelConfig(vocab_size=dataset.vocab_size, **kw))


def greedy_hits(model, probes):
    """The definition: generate len(answer) tokens greedily from the prompt, compare."""
    hits = []
    for p in probes:
        out = model.generate(torch.tensor([p.prompt]), max_new_tokens=len(p.answer))
        hits.append(out[0, len(p.prompt) :].tolist() == p.answer)
    return torch.tensor(hits)


@pytest.mark.parametrize("fmt", ["records", "bios", "qa"])
def test_teacher_forced_hits_equal_greedy_generation(fmt):
    ds = build_dataset(DataConfig(facts=FactsConfig(people=6, choices=4, formats="records,bios,qa", seed=1)))
    model = tiny_model(ds).eval()
    probes = [p for p in ds.probes(fmt) if len(p.prompt) + len(p.answer) <= 48][:24]
    assert probes
    # an untrained model rarely hits: make some probes hit by construction, by asking for its own greedy output
    forged = []
    for p in probes[:8]:
        out = model.generate(torch.tensor([p.prompt]), max_new_tokens=len(p.answer))[0, len(p.prompt) :].tolist()
        forged.append(type(p)(p.person, p.attribute, p.prompt, out, p.heldout))
    probes = forged + probes
    expected = greedy_hits(model, probes)
    assert expected[:8].all()
    assert torch.equal(probe_hits(model, probes, batch_size=5), expected)


def memorised(steps=150):
    """A tiny model trained on 4 people's records until it knows them (about 1-2 s on one core)."""
    ds = build_dataset(DataConfig(facts=FactsConfig(people=4, choices=3, formats="records")))
    model = tiny_model(ds)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    for step in range(steps):
        x, y = ds.train_batch(step, 8, 32)
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ds, model


def test_a_model_that_memorised_a_tiny_set_recalls_every_fact():
    ds, model = memorised()
    model.train()
    out = evaluate(model, ds, batch_size=4, seq_len=32)
    assert model.training  # the mode is restored
    assert out["recall/records"] == 1.0
    assert {f"recall/records/{a}" for a in ATTRIBUTES} <= set(out)
    assert all(out[f"recall/records/{a}"] == 1.0 for a in ATTRIBUTES)
    assert out["loss"] < 1.0 and out["ppl"] == pytest.approx(torch.tensor(out["loss"]).exp().item(), rel=1e-6)
    assert "recall/bios" not in out and "qa_heldout" not in out  # only the trained formats are probed
    # it stores nearly every bit of the 24 facts (4 people over 3 values: 1.5 bits each)
    assert 0.9 * 36 < out["bits/records"] <= 36


def test_prior_bits_are_the_entropy_of_each_attributes_values():
    ds = build_dataset(DataConfig(facts=FactsConfig(people=4, choices=3, formats="records")))
    for a in ATTRIBUTES:  # 4 people over 3 values used round-robin: counts 2, 1, 1
        probes = [p for p in ds.probes("records") if p.attribute == a]
        assert [p.prior_bits for p in probes] == pytest.approx([1.5] * 4)


def test_probe_scores_nll_is_the_answers_log_likelihood():
    ds = build_dataset(DataConfig(facts=FactsConfig(people=6, choices=4, formats="records,bios")))
    model = tiny_model(ds).eval()
    probes = [p for p in ds.probes("bios") if len(p.prompt) + len(p.answer) <= 48][:12] + ds.probes("records")[:5]
    hits, nll = probe_scores(model, probes, batch_size=3)
    assert torch.equal(hits, greedy_hits(model, probes))
    for p, value in zip(probes, nll.tolist()):  # one probe at a time, from the whole sequence's log-probabilities
        logp = model(torch.tensor([p.prompt + p.answer])).logits[0].log_softmax(-1)
        want = -sum(logp[len(p.prompt) - 1 + i, t].item() for i, t in enumerate(p.answer))
        assert value == pytest.approx(want, rel=1e-5)


def test_stored_bits_by_hand():
    ds = build_dataset(DataConfig(facts=FactsConfig(people=4, choices=3, formats="records")))
    probes = ds.probes("records")[:4]
    prior = sum(p.prior_bits for p in probes)
    assert stored_bits(probes, torch.zeros(4), 4) == pytest.approx(prior)  # certain of every answer: all of it
    at_prior = torch.tensor([p.prior_bits * math.log(2) for p in probes])  # as good as the value frequencies
    assert stored_bits(probes, at_prior, 4) == pytest.approx(0, abs=1e-6)
    assert stored_bits(probes, torch.zeros(4), 12) == pytest.approx(3 * prior)  # a sample of 4 of 12 facts
    assert stored_bits(probes, torch.full((4,), 10.0), 4) < 0  # worse than the value frequencies
    assert stored_bits([type(p)(p.person, p.attribute, p.prompt, p.answer, False) for p in probes],
                       torch.zeros(4), 4) is None  # no prior (a user's probes file)  # fmt: skip


def test_an_untrained_model_recalls_almost_nothing_and_limit_subsamples():
    ds = build_dataset(DataConfig(facts=FactsConfig(people=50, formats="records,bios,qa")))
    model = tiny_model(ds, max_seq_len=128)
    full = evaluate(model, ds, batch_size=4, seq_len=64)
    assert full["recall/records"] < 0.05 and full["qa_heldout"] < 0.05
    assert {"recall/records", "recall/bios", "recall/qa", "qa_heldout"} <= set(full)
    sub = evaluate(model, ds, limit=50, batch_size=4, seq_len=64)  # 300 probes: a stride of 6 would alias
    assert sub["recall/records"] in {i / 50 for i in range(51)}
    assert {f"recall/records/{a}" for a in ATTRIBUTES} <= set(sub)  # the sample spans every attribute


def test_memory_usage_is_reported_per_memory_layer():
    ds = build_dataset(DataConfig(facts=FactsConfig(people=4, choices=3, formats="records")))
    spec = MemorySpec(layers="0,1", preset="memory_plus", pool="v", options=dict(n_keys=8, heads=2, topk=4))
    model = tiny_model(ds, memories=[spec])
    x, y = ds.train_batch(0, 4, 32)
    model(x, y)  # one training forward fills the usage trackers
    out = evaluate(model, ds, batch_size=4, seq_len=32)
    for block in (0, 1):
        assert 0 < out[f"memory/{block}/coverage"] <= 1
        assert f"memory/{block}/kl_weighted" in out
