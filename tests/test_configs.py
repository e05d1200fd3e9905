"""The example configs shipped in memlayers/configs/ load (as paths and as ``memlayers:NAME``), and train for a
few steps (shrunk by overrides)."""

import json
import os
from pathlib import Path

import pytest

from memlayers import cli
from memlayers.train import load_config, train
from memlayers.train.config import packaged_configs

CONFIGS = sorted((Path(__file__).parent.parent / "memlayers" / "configs").glob("*.yaml"))
SHRINK = ["model.dim=32", "model.n_heads=2", "train.steps=3", "train.batch_size=2", "train.seq_len=32",
          "train.warmup=1", "train.eval_every=0", "train.eval_limit=8", "train.threads=1", "train.progress=false"]  # fmt: skip
STDLIB_JSON = os.path.dirname(json.__file__)  # a small local text corpus: the json package's sources


def test_there_are_example_configs():
    assert {p.name for p in CONFIGS} >= {"facts_memory_plus.yaml", "text_bytes.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_trains(path, tmp_path):
    overrides = SHRINK + (["data.facts.people=20"] if "facts" in path.name else [f"data.text.paths=[{STDLIB_JSON}]"])
    cfg = load_config(path, overrides)
    result = train(cfg, tmp_path / "run", evaluate=False)
    assert result["steps"] == 3 and result["final_loss"] > 0
    assert result["accounting"]["memory_params"] > 0


def test_packaged_configs_load_by_name():
    assert packaged_configs() == sorted(p.stem for p in CONFIGS)
    for path in CONFIGS:
        assert load_config(f"memlayers:{path.stem}", ["train.steps=7"]) == load_config(path, ["train.steps=7"])
        assert load_config(f"memlayers:{path.stem}.yaml") == load_config(path)


def test_unknown_packaged_config_lists_the_names():
    with pytest.raises(FileNotFoundError, match="no config 'memlayers:nope' ships with memlayers; available: "
                       "memlayers:facts_memory_plus, memlayers:text_bytes"):  # fmt: skip
        load_config("memlayers:nope")


def test_cli_resolves_packaged_configs_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", "memlayers:facts_memory_plus", "--print-config", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "kind: facts" in out and "steps: 7" in out and "preset: memory_plus" in out
    assert cli.main(["train", "--config", "memlayers:nope", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memlayers train: error: no config 'memlayers:nope'") and "memlayers:text_bytes" in err
