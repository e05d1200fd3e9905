"""memlayers compare: presets matched in FLOPs/token (and MoE in total params), the runner's outputs,
reuse of finished arms, and bad input."""

import dataclasses
import json
import math
import statistics

import pytest
import torch

from memlayers.accounting import account
from memlayers.compare import PRESETS, CompareConfig, get_preset, run_compare
from memlayers.compare.presets import standard_arms
from memlayers.compare.report import format_table
from memlayers.data import build_dataset
from memlayers.data.facts import FactsConfig
from memlayers.model import Transformer
from memlayers.train import TrainConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_arms_are_matched(name):
    preset = get_preset(name)
    vocab = build_dataset(preset.data).vocab_size
    acc = {}
    for arm, cfg in preset.arms.items():
        with torch.device("meta"):  # the gpu preset's tables would take GBs
            model = Transformer(dataclasses.replace(cfg, vocab_size=vocab))
        acc[arm] = account(model, preset.train.seq_len)
    flops = {arm: a.flops_per_token / acc["dense"].flops_per_token for arm, a in acc.items()}
    scaled = {"dense_2x": (1.8, 2.2), "dense_4x": (3.6, 4.4)}
    for arm, ratio in flops.items():
        low, high = scaled.get(arm, (0.9, 1.1))
        assert low < ratio < high, (arm, ratio)
    assert acc["memory_plus"].memory_params > 2 * acc["dense"].total_params
    if "moe" in acc:
        assert acc["moe"].total_params == pytest.approx(acc["memory_plus"].total_params, rel=0.15)
        assert acc["moe"].active_params == pytest.approx(acc["dense"].active_params, rel=0.1)
    else:  # the family: every memory kind with about the same memory parameters
        for arm in set(acc) - {"dense"}:
            assert acc[arm].memory_params == pytest.approx(acc["memory_plus"].memory_params, rel=0.05), arm
    assert preset.train.seq_len <= min(cfg.max_seq_len for cfg in preset.arms.values())


def test_the_capacity_preset_holds_more_bits_than_two_per_dense_parameter():
    preset = get_preset("gpu_capacity")
    ds = build_dataset(preset.data)
    bits = sum(p.prior_bits for p in ds.probes("records"))  # 6 facts a person, log2(1000) bits each
    assert bits == pytest.approx(6 * 50_000 * math.log2(1000))
    with torch.device("meta"):
        dense = Transformer(dataclasses.replace(preset.arms["dense"], vocab_size=ds.vocab_size))
    assert bits > 2 * account(dense, preset.train.seq_len).total_params
    t = preset.train
    assert t.steps * t.batch_size * t.seq_len / ds.tokens_per_epoch > 400  # passes over the facts: to a plateau


def test_family_preset_has_one_arm_per_kind():
    assert list(get_preset("cpu_family").arms) == ["dense", "memory_plus", "peer", "ultramem", "ultramem_v2", "engram"]
    assert list(get_preset("cpu").arms) == ["dense", "dense_2x", "dense_4x", "moe", "memory", "memory_plus"]


def tiny_preset() -> CompareConfig:
    arms = standard_arms(
        dim=32, n_layers=2, n_heads=2, max_seq_len=16, dim_2x=48, dim_4x=64, moe_experts=4,
        memory=dict(n_keys=8, heads=2, topk=4, query_norm="batchnorm"), memory_layer="1", memory_plus_layers="0,1",
    )  # fmt: skip
    data = get_preset("cpu").data
    data.facts = FactsConfig(people=10, choices=5, formats="records")
    train = TrainConfig(steps=6, batch_size=4, seq_len=16, warmup=2, log_every=2, ckpt_every=3, eval_every=0,
                        progress=False, threads=1)  # fmt: skip
    return CompareConfig(name="tiny", description="test", data=data, train=train, arms=arms)


def test_run_compare_writes_the_table_files_and_plots_and_reuses_finished_arms(tmp_path, capsys):
    rows = run_compare(tiny_preset(), str(tmp_path), arms=["dense", "moe", "memory_plus"], progress=False)
    assert [r["arm"] for r in rows] == ["dense", "moe", "memory_plus"]
    dense, _, memory_plus = rows
    assert dense["flops_ratio"] == 1.0 and dense["memory_params"] == 0
    assert memory_plus["memory_params"] == 8 * 8 * 32 and memory_plus["memory_usage"] is not None
    for row in rows:
        assert 0.0 <= row["recall/records"] <= 1.0 and row["final_loss"] > 0 and row["tokens"] == 6 * 4 * 16
        assert row["bits"] == row["bits/records"] and row["bits_per_param"] == row["bits"] / row["total_params"]
        assert row["bits_per_flop"] == row["bits"] / row["flops_per_token"]
    for name in ("results.json", "results.csv", "results.md", "loss.png", "recall_vs_flops.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "results.png").exists() is False
    assert not (tmp_path / "recall_vs_tokens.png").exists()  # eval_every=0: only the final point, no curve
    printed = capsys.readouterr().out
    assert "memory_plus" in printed and "FLOPs/token" in printed

    def mtimes():  # of the run's files (the lock file records each run's pid)
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "dense").iterdir() if p.name != ".memlayers.lock"}

    before = mtimes()
    again = run_compare(tiny_preset(), str(tmp_path), arms=["dense", "moe", "memory_plus"], progress=False)
    assert again == rows  # nothing retrained: the saved results come back
    assert mtimes() == before


def test_overrides_reach_every_arm_and_a_changed_config_is_refused(tmp_path):
    run_compare(tiny_preset(), str(tmp_path), arms=["dense"], overrides=["train.steps=4"], progress=False)
    with pytest.raises(ValueError, match="train.lr"):  # (a larger train.steps alone would extend the arm)
        run_compare(tiny_preset(), str(tmp_path), arms=["dense"], overrides=["train.steps=4", "train.lr=0.1"],
                    progress=False)  # fmt: skip


def test_a_failing_arm_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    from memlayers.compare import runner

    real_train = runner.train

    def train(cfg, out, **kw):
        if out.endswith("moe"):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_train(cfg, out, **kw)

    monkeypatch.setattr(runner, "train", train)
    with pytest.raises(RuntimeError, match=r"1 arm\(s\) failed.*moe: OutOfMemoryError.*rerun the same command"):
        run_compare(tiny_preset(), str(tmp_path), arms=["dense", "moe", "memory"], progress=False)
    assert "arm 'moe' failed" in capsys.readouterr().err
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["dense", "memory"]  # the finished arms are reported
    monkeypatch.setattr(runner, "train", real_train)
    rows = run_compare(tiny_preset(), str(tmp_path), arms=["dense", "moe", "memory"], progress=False)
    assert [r["arm"] for r in rows] == ["dense", "moe", "memory"]


def test_bad_input():
    with pytest.raises(ValueError, match="unknown compare preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['dens'\]"):
        run_compare(tiny_preset(), "unused", arms=["dens"], progress=False)
    with pytest.raises(ValueError, match="unknown config key"):
        run_compare(tiny_preset(), "unused", overrides=["train.stepz=3"], progress=False)


def test_format_table_skips_empty_columns_and_shows_missing_values():
    table = format_table([dict(arm="a", total_params=10, flops_per_token=5.0), dict(arm="bb", total_params=2000)])
    lines = table.splitlines()
    assert lines[0].split() == ["arm", "params", "FLOPs/token"]
    assert lines[2].split() == ["a", "10", "5"] and lines[3].split() == ["bb", "2,000", "-"]


def test_an_override_that_does_not_fit_one_arm_names_the_arm():
    from memlayers.compare.runner import arm_configs

    with pytest.raises(ValueError, match=r"^arm 'dense': .*model.memories.*pick arms with --arms"):
        arm_configs(get_preset("cpu_family"), ["model.memories[0].options.n_keys=8"])
    assert set(arm_configs(get_preset("cpu_family"), ["model.memories[0].options.topk=8"], ["peer"])) == {"peer"}


def test_seeds_report_mean_and_spread_and_reuse_finished_runs(tmp_path, capsys):
    """--seeds 3: the plain runs are seed 1 of 3 (reused, not retrained), seeds 2 and 3 draw init and order from
    train.seed + k (the facts stay), and each arm's row is the mean with its spread."""
    run_compare(tiny_preset(), str(tmp_path), arms=["dense", "memory"], progress=False)
    before = (tmp_path / "dense" / "result.json").stat().st_mtime_ns
    rows = run_compare(tiny_preset(), str(tmp_path), arms=["dense", "memory"], progress=False, seeds=3)
    assert (tmp_path / "dense" / "result.json").stat().st_mtime_ns == before
    assert [r["arm"] for r in rows] == ["dense", "memory"] and all(r["seeds"] == 3 for r in rows)
    for row in rows:
        losses = [run["final_loss"] for run in row["runs"]]
        assert [run["seed"] for run in row["runs"]] == [0, 1, 2]
        assert row["final_loss"] == pytest.approx(sum(losses) / 3)
        assert row["final_loss_std"] == pytest.approx(statistics.stdev(losses)) and row["final_loss_std"] > 0
        assert (row["final_loss_min"], row["final_loss_max"]) == (min(losses), max(losses))
        assert row["total_params"] == row["runs"][0]["total_params"]
    config = json.loads((tmp_path / "memory.seed2" / "result.json").read_text())["config"]
    assert config["train"]["seed"] == 2 and config["data"]["order_seed"] == 2
    assert "±" in capsys.readouterr().out and "±" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())[0]["runs"][1]["seed"] == 1
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        run_compare(tiny_preset(), str(tmp_path), seeds=0, progress=False)


def test_aggregate_by_hand():
    from memlayers.compare.report import aggregate

    rows = aggregate([
        {"arm": "a", "seed": 0, "final_loss": 1.0, "memory_usage": None, "total_params": 5},
        {"arm": "b", "seed": 0, "final_loss": 2.0},
        {"arm": "a", "seed": 1, "final_loss": 3.0, "memory_usage": None, "total_params": 5},
    ])  # fmt: skip
    a, b = rows
    assert (a["arm"], a["seeds"], b["seeds"]) == ("a", 2, 1)
    assert a["final_loss"] == 2.0 and a["final_loss_std"] == pytest.approx(2**0.5)
    assert (a["final_loss_min"], a["final_loss_max"]) == (1.0, 3.0) and "memory_usage" not in a
    assert "final_loss_std" not in b  # one seed: no spread
    table = format_table(rows)
    assert "2.000 ± 1.414" in table and "5 ±" not in table  # no spread for what the architecture fixes


def test_another_order_seed_keeps_the_facts_and_changes_the_order():
    from memlayers.data import DataConfig, FactsConfig, build_dataset

    base = build_dataset(DataConfig(facts=FactsConfig(people=20)))
    other = build_dataset(DataConfig(facts=FactsConfig(people=20), order_seed=7))
    assert other.documents == base.documents
    assert not torch.equal(other.train_batch(0, 4, 16)[0], base.train_batch(0, 4, 16)[0])
    same = build_dataset(DataConfig(facts=FactsConfig(people=20), order_seed=0))  # the facts' own seed
    assert torch.equal(same.train_batch(0, 4, 16)[0], base.train_batch(0, 4, 16)[0])


def test_tune_lr_sweeps_each_arm_and_trains_every_seed_at_its_choice(tmp_path, monkeypatch):
    """--tune-lr: every arm's short runs at each factor, the lowest validation loss chosen (a diverged run loses),
    every seed trained at the choice, the sweep written and reused; the recall curve plotted with eval_every."""
    from memlayers.compare import tuning
    from memlayers.train.checkpoint import NonFiniteError

    real_train = tuning.train
    # None: diverges; 8 and 0.125 extend the grid past the winner at its edge (by its spacing, x4)
    losses = {"dense": {0.5: 3.0, 2.0: 2.0, 8.0: 2.5}, "memory": {0.5: 1.0, 2.0: None, 0.125: 1.5}}

    def fake_sweep(cfg, out, **kw):
        arm, factor = out.rsplit("/", 1)[1].split(".lr")
        real = real_train(cfg, out, **kw)  # a real (short) run: its config and files are checked below
        assert cfg.train.steps == 2 and cfg.train.eval_every == 0  # a quarter of the 6 steps, rounded
        loss = losses[arm][float(factor)]
        if loss is None:
            raise NonFiniteError("diverged (simulated)")
        return {**real, "eval": {**real["eval"], "loss": loss}}

    monkeypatch.setattr(tuning, "train", fake_sweep)
    overrides = ["train.eval_every=3"]
    rows = run_compare(tiny_preset(), str(tmp_path), arms=["dense", "memory"], progress=False, seeds=2,
                       tune_lr=[2, 0.5], overrides=overrides)  # fmt: skip
    base = tiny_preset().train.lr
    assert [r["lr"] for r in rows] == [pytest.approx(2 * base), pytest.approx(0.5 * base)]
    for arm, factor in (("dense", 2), ("memory", 0.5)):
        for name in (arm, f"{arm}.seed1"):
            assert json.loads((tmp_path / name / "result.json").read_text())["config"]["train"]["lr"] == pytest.approx(
                factor * base
            )
    sweep = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert sweep["arms"]["memory"]["losses"] == {"0.125": 1.5, "0.5": 1.0, "2": None}
    assert sweep["arms"]["dense"]["factor"] == 2 and sweep["factors"] == [0.125, 0.5, 2.0, 8.0]
    assert (
        "**2.0000**" in (tmp_path / "lr_sweep.md").read_text() and "diverged" in (tmp_path / "lr_sweep.md").read_text()
    )
    assert (tmp_path / "recall_vs_tokens.png").stat().st_size > 0

    def mtimes():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "lr_sweep").glob("*/result.json")}

    before = mtimes()
    assert len(before) == 6
    again = run_compare(tiny_preset(), str(tmp_path), arms=["dense", "memory"], progress=False, seeds=2,
                        tune_lr=[2, 0.5], overrides=overrides)  # fmt: skip
    assert again == rows and mtimes() == before  # the sweep's finished runs reused
    with pytest.raises(ValueError, match="factors must be positive"):
        run_compare(tiny_preset(), str(tmp_path), arms=["dense"], progress=False, tune_lr=[0.0], overrides=overrides)


def test_tune_lr_refuses_when_every_lr_diverges(tmp_path, monkeypatch):
    from memlayers.compare import tuning
    from memlayers.train.checkpoint import NonFiniteError

    def diverge(cfg, out, **kw):
        raise NonFiniteError("diverged (simulated)")

    monkeypatch.setattr(tuning, "train", diverge)
    with pytest.raises(ValueError, match="every learning rate tried for arm 'dense' diverged"):
        run_compare(tiny_preset(), str(tmp_path), arms=["dense"], progress=False, tune_lr=[1.0])
