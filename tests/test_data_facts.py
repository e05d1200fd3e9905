"""The synthetic biography world: determinism, choices, formats, probes, held-out QA."""

import time
from collections import Counter

import pytest
import torch

from memlayers.data import ATTRIBUTES, FORMATS, FactsConfig, FactsDataset, generate_choices, generate_people
from memlayers.data.facts import BIO_TEMPLATES

ALL = "records,bios,qa"


@pytest.fixture(scope="module")
def world():
    return FactsDataset(FactsConfig(people=600, choices=150, formats=ALL, seed=7))


def test_same_seed_same_world_other_seed_other_world():
    a = FactsDataset(FactsConfig(people=300, formats=ALL, seed=1))
    b = FactsDataset(FactsConfig(people=300, formats=ALL, seed=1))
    c = FactsDataset(FactsConfig(people=300, formats=ALL, seed=2))
    assert a.documents == b.documents and a.tokenizer.words == b.tokenizer.words and a.heldout == b.heldout
    for step in (0, 9):
        assert all(torch.equal(u, v) for u, v in zip(a.train_batch(step, 4, 32), b.train_batch(step, 4, 32)))
    assert [p.name for p in a.people] != [p.name for p in c.people]
    assert a.choices["birth_city"] != c.choices["birth_city"]
    assert a.documents != c.documents and a.heldout != c.heldout
    assert not torch.equal(a.train_batch(0, 4, 32)[0], c.train_batch(0, 4, 32)[0])


def test_names_unique_and_disjoint_from_values(world):
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names) == 600
    assert all(len(n.split()) == 2 and n.replace(" ", "").isalpha() for n in names)
    name_words = {w for n in names for w in n.split()}
    value_words = {w for vs in world.choices.values() for v in vs for w in v.split()}
    assert not name_words & value_words
    # first names are shared by several people: only the pair identifies a person
    assert max(Counter(p.first for p in world.people).values()) > 1


@pytest.mark.parametrize("people,choices", [(1000, 200), (900, 300), (100, 400)])
def test_choices_honoured_and_balanced(people, choices):
    cfg = FactsConfig(people=people, choices=choices, seed=3)
    pools = generate_choices(cfg)
    assert set(pools) == set(ATTRIBUTES)
    assert pools["birth_city"] == pools["work_city"]
    for attr, pool in pools.items():
        assert len(pool) == len(set(pool)) == choices, attr
        assert all(1 <= len(v.split()) <= 4 for v in pool), attr
    for attr in ATTRIBUTES:
        counts = Counter(p.values[attr] for p in generate_people(cfg))
        assert set(counts) <= set(pools[attr])
        assert len(counts) == min(people, choices)  # every value used when people >= choices
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced: no majority-class shortcut
    dates = [v.split() for v in pools["birth_date"]]
    assert all(1 <= int(d) <= 28 and 1940 <= int(y) <= 2004 for d, _, y in dates)


def test_documents_decode_to_the_expected_text(world):
    tok = world.tokenizer
    p = world.people[0]
    texts = {tok.decode(d) for d in world.documents}
    for attr in ATTRIBUTES:
        assert f"{p.name} {attr} {p.values[attr]}" in texts
    # every document is bos ... eos and re-encodes from its text
    for doc in world.documents[:: max(1, len(world.documents) // 200)]:
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
        assert tok.encode(tok.decode(doc)) == doc[1:-1]
    assert world.documents_per_format == {"records": 600 * 6, "bios": 600, "qa": (600 - len(world.heldout)) * 6}


def test_value_at_end_prompt_plus_answer_is_a_trained_prefix(world):
    tok = world.tokenizer
    docs = {tuple(d) for d in world.documents}
    bios = [d for d in world.documents if tok.decode(d).count(" . ") == 5]
    assert len(bios) == 600
    bio_of = {tuple(d[1:3]): d for d in bios}  # every bio starts with its person's two name tokens
    for fmt in FORMATS:
        probes = world.probes(fmt)
        assert len(probes) == 600 * len(ATTRIBUTES)
        assert [(q.person, q.attribute) for q in probes[:7]] == [(0, a) for a in ATTRIBUTES] + [(1, ATTRIBUTES[0])]
        for q in probes:
            person = world.people[q.person]
            assert q.prompt[0] == tok.bos_id and tok.eos_id not in q.prompt
            assert tok.decode(q.answer) == person.values[q.attribute]
            assert person.name in tok.decode(q.prompt)
            if fmt == "bios":  # the bio up to and including the value, then "."
                assert not q.heldout
                bio = bio_of[tuple(q.prompt[1:3])]
                n = len(q.prompt) + len(q.answer)
                assert bio[:n] == q.prompt + q.answer and tok.decode(bio[n : n + 1]) == "."
            else:  # records and QA: the whole document but eos; trained unless held out
                assert (tuple(q.prompt + q.answer + [tok.eos_id]) in docs) == (not q.heldout)
    name = world.people[0].name
    assert tok.decode(world.probes("records")[1].prompt) == f"{name} birth_city"
    assert tok.decode(world.probes("qa")[1].prompt) == f"Q : what is the birth city of {name} ? A :"


def test_heldout_qa_never_trained_but_their_facts_are(world):
    tok = world.tokenizer
    held = set(world.heldout)
    assert len(held) == round(0.2 * 600)
    texts = [tok.decode(d) for d in world.documents]
    qa_texts = [t for t in texts if t.startswith("Q :")]
    for i in held:
        name = world.people[i].name
        assert not any(name + " " in t for t in qa_texts)
        assert sum(t.startswith(name + " ") for t in texts) == 6 + 1  # six records and one bio
    trained_qa = {t for t in qa_texts}
    assert len(trained_qa) == (600 - len(held)) * 6
    qa = world.probes("qa")
    assert {q.person for q in qa if q.heldout} == held
    # records and bios probes of held-out people are trained
    assert not any(q.heldout for q in world.probes("records"))


def test_untrained_formats_are_flagged_heldout():
    ds = FactsDataset(FactsConfig(people=100, formats="records"))
    assert ds.formats == ["records"] and ds.probe_formats == ["records"]
    assert all(q.heldout for q in ds.probes("qa")) and all(q.heldout for q in ds.probes("bios"))
    assert not any(q.heldout for q in ds.probes("records"))
    with pytest.raises(ValueError, match="unknown format 'wiki'"):
        ds.probes("wiki")


def test_vocab_is_independent_of_formats_and_heldout():
    base = FactsDataset(FactsConfig(people=200, formats="records"))
    other = FactsDataset(FactsConfig(people=200, formats="bios,qa", heldout_fraction=0.5))
    assert base.tokenizer.words == other.tokenizer.words
    assert base.people == other.people
    # probes encode for every format, held-out QA included
    assert len(base.probes("qa")) == 200 * 6


def test_formats_are_a_set_in_canonical_order():
    a = FactsDataset(FactsConfig(people=80, formats="bios, records"))
    b = FactsDataset(FactsConfig(people=80, formats="records,bios"))
    assert a.formats == b.formats == ["records", "bios"] and a.documents == b.documents


def test_bios_use_templates_and_shuffled_order(world):
    tok = world.tokenizer
    bios = [tok.decode(d) for d in world.documents if tok.decode(d).count(" . ") == 5]
    first_templates = Counter()
    orders = set()
    for bio, person in zip(bios, world.people):
        sentences = [s.strip() for s in bio.split(" .") if s.strip()]
        assert len(sentences) == 6 and all(s.startswith(person.name + " ") for s in sentences)
        order = []
        for s in sentences:
            rest = s[len(person.name) + 1 :]
            attr = next(a for a in ATTRIBUTES for t in BIO_TEMPLATES[a][:4] if rest == f"{t} {person.values[a]}")
            order.append(attr)
            if attr == "birth_city":
                first_templates[rest[: -len(person.values[attr]) - 1]] += 1
        assert sorted(order) == sorted(ATTRIBUTES)
        orders.add(tuple(order))
    assert len(orders) > 100  # sentence order is shuffled per person
    assert set(first_templates) == set(BIO_TEMPLATES["birth_city"][:4])  # all 4 templates in use, no others


def test_val_batches_fixed_and_from_training_documents(world):
    v1 = world.val_batches(batch_size=8, seq_len=64, limit=20)
    v2 = FactsDataset(FactsConfig(people=600, choices=150, formats=ALL, seed=7)).val_batches(8, 64, limit=20)
    assert [x.shape[0] for x, _ in v1] == [8, 8, 4]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(v1, v2))
    x, y = v1[0]
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < world.vocab_size
    # a separately seeded packing: not the training stream's first rows
    assert not torch.equal(x, world.train_batch(0, 8, 64)[0])
    full = world.val_batches(64, 64)
    assert sum(b[0].shape[0] for b in full) == -(-world.tokens_per_epoch // 64)


def test_config_errors():
    for kwargs, match in [
        ({"formats": "records,wiki"}, "FactsConfig.formats: unknown format"),
        ({"formats": ""}, "FactsConfig.formats"),
        ({"formats": "qa"}, "add 'records' or 'bios'"),
        ({"choices": 1}, "FactsConfig.choices"),
        ({"choices": 5000}, "FactsConfig.choices"),
        ({"people": 0}, "FactsConfig.people"),
        ({"heldout_fraction": 1.0}, "FactsConfig.heldout_fraction"),
        ({"bio_templates": 0}, "FactsConfig.bio_templates"),
        ({"bio_templates": 7}, "FactsConfig.bio_templates"),
    ]:
        with pytest.raises(ValueError, match=match):
            FactsDataset(FactsConfig(**kwargs))


def test_describe_and_generation_speed():
    t0 = time.perf_counter()
    ds = FactsDataset(FactsConfig())
    assert time.perf_counter() - t0 < 2.0  # ~0.05 s on one core
    d = ds.describe()
    assert d["people"] == 1000 and d["heldout_people"] == 200 and d["formats"] == "records,bios"
    assert d["documents"] == 7000 == len(ds.documents)
    assert d["tokens_per_epoch"] == sum(map(len, ds.documents))
    assert d["vocab_size"] == ds.vocab_size == ds.tokenizer.vocab_size
    t0 = time.perf_counter()
    big = FactsDataset(FactsConfig(people=20_000, formats=ALL))
    assert time.perf_counter() - t0 < 10.0  # ~1 s
    assert len({p.name for p in big.people}) == 20_000
