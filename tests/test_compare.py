"""memlayers compare: presets matched in FLOPs/token (and MoE in total params), the runner's outputs,
reuse of finished arms, and bad input."""

import dataclasses

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
    for name in ("results.json", "results.csv", "results.md", "loss.png", "recall_vs_flops.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "results.png").exists() is False
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
