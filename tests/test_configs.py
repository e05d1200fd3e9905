"""The example configs in configs/ load, and train for a few steps (shrunk by overrides)."""

import json
import os
from pathlib import Path

import pytest

from memlayers.train import load_config, train

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
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
