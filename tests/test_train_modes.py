"""Training under bf16 autocast and under torch.compile (CPU): it runs, and tracks the fp32 eager run."""

import json

import pytest
from test_train import tiny

from memlayers.train import train


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    out = tmp_path_factory.mktemp("eager")
    train(tiny(), out, evaluate=False)
    return losses(out)


def test_bf16_autocast_tracks_fp32(eager, tmp_path):
    result = train(tiny("train.dtype=bfloat16"), tmp_path, evaluate=False)
    assert result["dtype"] == "bfloat16"
    assert losses(tmp_path) == pytest.approx(eager, rel=2e-2)
    assert losses(tmp_path) != eager  # it really ran in bf16


def test_torch_compile_matches_eager(eager, tmp_path):
    train(tiny("train.compile=true"), tmp_path, evaluate=False)
    assert losses(tmp_path) == pytest.approx(eager, rel=1e-3)
