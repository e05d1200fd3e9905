"""The trainer with ``train.fused_values``: the same run as the unfused row-sparse optimizer, micro-batches and
resume included; the settings it cannot take are refused up front."""

import pytest
from test_train import MEMORY, TINY, records, weights

from memlayers.train import load_config, read_checkpoint, train

FUSED = ["train.value_optimizer=sparse_adam", "train.value_clip=null"]


def cfg(*extra, fused: bool):
    options = "" if fused else ", sparse_values: true"
    return load_config(None, TINY + [MEMORY % options, *FUSED, *(["train.fused_values=true"] if fused else []), *extra])


@pytest.mark.parametrize("accum", [1, 2])
def test_fused_run_equals_unfused_run(tmp_path, accum):
    split = ["train.steps=6", f"train.batch_size={4 // accum}", f"train.grad_accum={accum}"]
    plain = train(cfg(*split, fused=False), tmp_path / "plain", evaluate=False)
    fused = train(cfg(*split, fused=True), tmp_path / "fused", evaluate=False)
    assert fused["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-4)
    for a, b in zip(records(tmp_path / "fused"), records(tmp_path / "plain")):
        for k in ("loss", "grad_norm", "value_grad_norm", "value_lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
    assert records(tmp_path / "fused")[-1]["value_grad_norm"] > 0
    wa, wb = weights(tmp_path / "fused"), weights(tmp_path / "plain")
    for k in wb:
        assert (wa[k] - wb[k]).norm() <= 1e-4 * wb[k].norm() + 1e-6, k


def test_fused_run_resumes_exactly(tmp_path, monkeypatch):
    from test_train import Interrupt, crash_at

    c = cfg("train.steps=8", fused=True)
    ref = train(c, tmp_path / "ref", evaluate=False)
    crash_at(monkeypatch, 5)  # checkpoint at step 4
    with pytest.raises(Interrupt):
        train(c, tmp_path / "run", evaluate=False)
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "run")["step"] == 4
    result = train(c, tmp_path / "run", evaluate=False)
    assert result["final_loss"] == ref["final_loss"]
    for k, v in weights(tmp_path / "ref").items():
        assert (weights(tmp_path / "run")[k] == v).all(), k


@pytest.mark.parametrize(
    "extra, match",
    [
        (["train.fused_values=true"], "train.fused_values: needs a row-wise value optimizer"),
        (["train.fused_values=true", "train.value_optimizer=sparse_adam"], "train.value_clip: is 1.0"),
    ],
)
def test_settings_fused_values_cannot_take(extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, TINY + [MEMORY % "", *extra])
