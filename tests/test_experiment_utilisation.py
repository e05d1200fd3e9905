"""``memlayers experiment utilisation``: tables over seeds with the decision rule, plots, reuse of finished runs,
both tasks end to end at toy sizes, and one-line errors."""

import json
import os

import pytest

import memlayers.experiments.utilisation as ut
from memlayers.cli import main
from memlayers.experiments.skewed_task import SkewedTask, make_facts, train_arm

TINY_SKEWED = SkewedTask(facts=64, dim=16, out=4, steps=12, batch=32, log_every=6,
                         layer=dict(n_keys=8, heads=2, topk=2, key_dim=8))  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        (folder / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(60)))
    return str(folder)


def test_skewed_facts_are_fixed_and_skewed():
    a, b = make_facts(SkewedTask()), make_facts(SkewedTask())
    assert all(a[k].equal(b[k]) for k in a)
    x = a["inputs"]
    assert x.mean(0).norm() > 5 * x.std(0).norm()  # a large shared mean: the queries all point one way
    assert a["probs"][0] == a["probs"].max() and abs(a["probs"].sum() - 1) < 1e-6


def test_skewed_arm_reports_loss_usage_and_curve():
    result = train_arm(TINY_SKEWED, ut.ARMS["all"], seed=0)
    final = result["final"]
    assert final["mse"] > 0 and final["tail_mse"] > 0 and 1 <= final["effective_k"] <= 2
    assert 0 < final["usage_weighted"] <= 1 and 0 <= final["dead_subkeys"] <= 1
    assert [p["step"] for p in result["curve"]] == [6, 12] and result["step_ms"] > 0
    again = train_arm(TINY_SKEWED, ut.ARMS["all"], seed=0)
    assert again["final"] == final  # a seed repeats exactly in one process
    assert train_arm(TINY_SKEWED, ut.ARMS["all"], seed=1)["final"] != final


def test_verdict_applies_the_rule():
    base = {"arm": "baseline", "mse": 1.0, "mse_std": 0.01, "usage_weighted": 0.1, "step_ms": 10.0}
    good = {"arm": "x", "mse": 0.9, "mse_std": 0.02, "usage_weighted": 0.2, "step_ms": 10.2}
    assert ut.verdict(good, base, "mse") == "default"
    assert ut.verdict({**good, "mse_std": 0.06}, base, "mse") == "no: loss x"  # 0.1 < 2 sigma = 0.12
    assert ut.verdict({**good, "usage_weighted": 0.11, "step_ms": 11.0}, base, "mse") == "no: usage x, time x"


def test_run_utilisation_skewed_writes_tables_plots_and_reuses(tmp_path, monkeypatch):
    rows = ut.run_utilisation(str(tmp_path), tasks=("skewed",), arms=["baseline", "restart"], seeds=2,
                              show=False, skewed=TINY_SKEWED)["skewed"]  # fmt: skip
    assert [r["arm"] for r in rows] == ["baseline", "restart"] and rows[0]["seeds"] == 2
    assert "mse_std" in rows[0] and rows[0]["mse_min"] <= rows[0]["mse"] <= rows[0]["mse_max"]
    table = (tmp_path / "skewed" / "results.md").read_text()
    assert "| baseline |" in table and "(baseline)" in table and "| restart |" in table
    assert (tmp_path / "skewed" / "usage.png").stat().st_size > 0
    saved = json.loads((tmp_path / "skewed" / "restart.seed1.json").read_text())
    assert saved["seed"] == 1 and saved["curve"]

    monkeypatch.setattr(ut, "train_arm", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = ut.run_utilisation(str(tmp_path), tasks=("skewed",), arms=["baseline", "restart"], seeds=2,
                               show=False, skewed=TINY_SKEWED)["skewed"]  # fmt: skip
    assert again == json.loads(json.dumps(rows))


def test_run_utilisation_text_end_to_end(tmp_path, corpus):
    text = ut.TextTask(steps=4, dim=32, layer=(("n_keys", 8), ("heads", 2), ("topk", 2)), batch_size=2, seq_len=32,
                       corpus=(corpus,), eval_every=2)  # fmt: skip
    rows = ut.run_utilisation(str(tmp_path), tasks=("text",), arms=["baseline", "balance"], seeds=1,
                              show=False, text=text)["text"]  # fmt: skip
    assert [r["arm"] for r in rows] == ["baseline", "balance"]
    assert all(r["loss"] > 0 and 0 < r["usage_weighted"] <= 1 for r in rows)
    run_dir = tmp_path / "text" / "balance.seed0"
    config = (run_dir / "config.yaml").read_text()
    assert "balance_loss: 0.01" in config and "query_norm: none" in config
    curve = json.loads((tmp_path / "text" / "results.json").read_text())
    assert curve[0]["seeds"] == 1
    assert os.path.exists(tmp_path / "text" / "usage.png")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["experiment", "utilisation", "--arms", "baseline,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown 'nope'" in err and "baseline" in err
    assert main(["experiment", "utilisation", "--preset", "tpu", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'tpu'" in capsys.readouterr().err
