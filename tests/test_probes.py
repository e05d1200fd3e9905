"""Recall of the user's own facts: ``load_probes`` (JSONL -> probes, byte and word tokenizers, errors),
``probe_recall`` and ``memlayers eval RUN --probes FILE.jsonl``."""

import json
import re

import pytest
from test_evaluate import memorised

from memlayers import cli
from memlayers.data import ByteTokenizer, DataConfig, build_dataset
from memlayers.data.facts import ATTRIBUTES, FactsConfig
from memlayers.evaluate import evaluate, load_probes, probe_recall
from memlayers.model import ModelConfig, Transformer


def write(path, lines):
    """One line per item: dicts as JSON, strings as they are."""
    path.write_text("".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in lines), encoding="utf-8")
    return path


def test_load_probes_with_the_byte_tokenizer(tmp_path):
    tok = ByteTokenizer()
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "The capital of Zorbia is", "answer": " Quux", "attribute": "capital"},
        "",  # blank lines are skipped (line numbers still count them)
        {"prompt": "", "answer": "ü", "extra": 1},
    ])  # fmt: skip
    a, b = load_probes(path, tok)
    assert a.prompt == [tok.bos_id] + list(b"The capital of Zorbia is") and a.answer == list(b" Quux")
    assert a.attribute == "capital" and a.person == 1 and not a.heldout
    assert b.prompt == [tok.bos_id] and b.answer == list("ü".encode()) and b.attribute == "" and b.person == 3


def test_probe_recall_of_facts_written_by_hand(tmp_path):
    ds, model = memorised()
    right = [{"prompt": f"{p.name} {a}", "answer": p.values[a], "attribute": a} for p in ds.people for a in ATTRIBUTES]
    wrong = [  # another person's city: never the trained answer here (every city differs from the right one)
        {"prompt": f"{p.name} birth_city", "answer": q.values["birth_city"], "attribute": "wrong"}
        for p, q in zip(ds.people, ds.people[1:] + ds.people[:1])
        if p.values["birth_city"] != q.values["birth_city"]
    ]
    assert wrong
    probes = load_probes(write(tmp_path / "p.jsonl", right + wrong), ds.tokenizer)
    # the word tokenizer encodes them exactly as the dataset's own record probes
    assert [(p.prompt, p.answer) for p in probes[: len(right)]] == [(p.prompt, p.answer) for p in ds.probes("records")]
    model.train()
    out = probe_recall(model, probes)
    assert model.training  # the mode is restored
    assert evaluate(model, ds, batch_size=4, seq_len=32)["recall/records"] == 1.0
    assert out["probes/recall"] == pytest.approx(len(right) / (len(right) + len(wrong)))
    assert out["probes/recall/wrong"] == 0.0 and all(out[f"probes/recall/{a}"] == 1.0 for a in ATTRIBUTES)
    assert set(out) == {"probes/recall", "probes/recall/wrong"} | {f"probes/recall/{a}" for a in ATTRIBUTES}
    assert probe_recall(model, []) == {}


def test_errors_are_one_line_and_name_the_line(tmp_path):
    tok = ByteTokenizer()
    ok = {"prompt": "a", "answer": "b"}
    cases = [
        ([ok, "{not json"], ValueError, r"p.jsonl:2: not valid JSON \(.*\); each line must be an object"),
        ([ok, ok, "[1, 2]"], ValueError, "p.jsonl:3: expected a JSON object with keys prompt and answer"),
        ([{"prompt": "a"}], ValueError, "p.jsonl:1: missing key.s. answer; each line needs prompt and answer"),
        ([{"question": "a"}], ValueError, "p.jsonl:1: missing key.s. prompt, answer"),
        ([{"prompt": 3, "answer": "b"}], ValueError, "p.jsonl:1: prompt must be a string, got 3"),
        ([{"prompt": "a", "answer": "b", "attribute": 1}], ValueError, "p.jsonl:1: attribute must be a string"),
        ([ok, {"prompt": "a", "answer": ""}], ValueError, "p.jsonl:2: empty answer"),
        (["", "  "], ValueError, "holds no probe"),
    ]
    for lines, error, match in cases:
        with pytest.raises(error, match=match) as e:
            load_probes(write(tmp_path / "p.jsonl", lines), tok)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="probes file .*missing.jsonl' does not exist"):
        load_probes(tmp_path / "missing.jsonl", tok)
    # the word tokenizer names an unknown word
    facts = build_dataset(DataConfig(facts=FactsConfig(people=4, choices=3, formats="records")))
    path = write(tmp_path / "w.jsonl", [{"prompt": f"{facts.people[0].name} birth_city", "answer": "Atlantis"}])
    with pytest.raises(ValueError, match="w.jsonl:1: WordTokenizer.encode: unknown word 'Atlantis'"):
        load_probes(path, facts.tokenizer)
    # longer than the model's context: prompt + answer - 1 tokens must fit max_seq_len
    model = Transformer(ModelConfig(vocab_size=259, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    fits = load_probes(write(tmp_path / "p.jsonl", [{"prompt": "x" * 8, "answer": "y" * 8}]), tok)  # 17 - 1 = 16
    assert set(probe_recall(model, fits)) == {"probes/recall"}
    long = load_probes(write(tmp_path / "p.jsonl", [ok, {"prompt": "x" * 8, "answer": "y" * 9}]), tok)
    with pytest.raises(ValueError, match="probe on line 2 is 17 tokens .* longer than the model's max_seq_len=16"):
        probe_recall(model, long)


TINY = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "train.batch_size=4",
        "train.seq_len=32", "train.warmup=1", "train.eval_every=0", "train.threads=1"]  # fmt: skip


def test_cli_eval_probes_on_a_text_run(tmp_path, capsys):
    """One file, no validation, trained until it continues a cycle of digits: the cli reports its recall."""
    (tmp_path / "digits.txt").write_text("0123456789" * 300)
    run = tmp_path / "run"
    text = ["data.kind=text", f"data.text.paths=[{tmp_path / 'digits.txt'}]", "data.text.val_fraction=0",
            "data.text.chunk_tokens=64", "train.steps=40", "train.lr=1e-2"]  # fmt: skip
    assert cli.main(["train", "--out", str(run), "--quiet", *TINY, *text]) == 0
    probes = write(tmp_path / "p.jsonl", [
        {"prompt": "0123", "answer": "4567", "attribute": "count"},
        {"prompt": "789", "answer": "0123", "attribute": "count"},
        {"prompt": "5", "answer": "5", "attribute": "repeat"},  # never in the text
    ])  # fmt: skip
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--probes", str(probes), "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"probes/recall/count +1.0000", printed)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["probes/recall"] == pytest.approx(2 / 3) and metrics["probes/recall/repeat"] == 0.0
    assert "loss" not in metrics  # val_fraction=0: no validation loss
    # errors: one line on stderr, exit status 2
    assert cli.main(["eval", str(run), "--probes", str(tmp_path / "nope.jsonl")]) == 2
    assert "memlayers eval: error: probes file" in capsys.readouterr().err
    write(probes, [{"prompt": "0" * 30, "answer": "123"}])
    assert cli.main(["eval", str(run), "--probes", str(probes)]) == 2
    err = capsys.readouterr().err
    assert "probe on line 1 is 33 tokens" in err and "max_seq_len=32" in err and err.count("\n") == 1


def test_cli_eval_probes_on_a_facts_run(tmp_path, capsys):
    run = tmp_path / "run"
    facts = ["data.facts.people=8", "data.facts.choices=4", "data.facts.formats=records", "train.steps=4"]
    assert cli.main(["train", "--out", str(run), "--quiet", *TINY, *facts]) == 0
    people = build_dataset(DataConfig(facts=FactsConfig(people=8, choices=4, formats="records"))).people
    lines = [{"prompt": f"{p.name} {a}", "answer": p.values[a], "attribute": a} for p in people for a in ATTRIBUTES]
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--probes", str(write(tmp_path / "p.jsonl", lines))]) == 0
    printed = capsys.readouterr().out
    assert "recall/records/birth_city" in printed and "probes/recall/birth_city" in printed
    write(tmp_path / "p.jsonl", lines[:2] + [{"prompt": "Nobody birth_city", "answer": "Paris"}])
    assert cli.main(["eval", str(run), "--probes", str(tmp_path / "p.jsonl")]) == 2
    assert "p.jsonl:3: WordTokenizer.encode: unknown word 'Nobody'" in capsys.readouterr().err
