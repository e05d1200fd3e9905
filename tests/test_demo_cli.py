"""The demo (memlayers.demo) and the command line (memlayers.cli), at tiny sizes."""

import json
import math

import pytest
import torch

import memlayers
from memlayers import cli
from memlayers.demo import DemoConfig, make_recall_task, run_demo

TINY = dict(facts=256, classes=16, dim=32, n_keys=16, heads=2, topk=4, batch_size=64, threads=1)
TINY_ARGS = ["--facts", "256", "--classes", "16", "--dim", "32", "--n-keys", "16", "--heads", "2", "--topk", "4",
             "--batch-size", "64", "--threads", "1"]  # fmt: skip


def test_task_is_deterministic_in_the_seed():
    a, b, c = (make_recall_task(512, 16, 32, seed=s) for s in (3, 3, 4))
    for name in ("inputs", "targets", "probs"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.inputs, c.inputs)
    assert not torch.equal(a.targets, c.targets)
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(a.sample(100, ga), b.sample(100, gb))


def test_task_shapes_and_ranges():
    task = make_recall_task(facts=300, dim=8, classes=5)
    assert task.inputs.shape == (300, 8) and task.inputs.dtype == torch.float32
    assert task.targets.shape == (300,) and 0 <= task.targets.min() and task.targets.max() < 5
    assert task.probs.sum().item() == pytest.approx(1.0)
    assert task.head.sum().item() == 30 and task.head[:30].all()
    with pytest.raises(ValueError, match="zipf"):
        make_recall_task(zipf=-1.0)


def test_task_is_zipf_skewed():
    task = make_recall_task(facts=1000, dim=8, classes=10, zipf=1.0)
    assert (task.probs[:-1] >= task.probs[1:]).all()  # fact 0 is the most frequent
    assert task.probs[0] / task.probs[9] == pytest.approx(10.0)  # p(rank r) ~ 1/r
    counts = torch.bincount(task.sample(50_000, torch.Generator().manual_seed(0)), minlength=1000).float()
    head, tail = counts[task.head], counts[~task.head]
    assert head.sum() > 2 * tail.sum()  # 10% of the facts get most of the draws (~2.9x the rest)
    assert counts[0] > 20 * tail.mean()
    uniform = make_recall_task(facts=1000, dim=8, classes=10, zipf=0.0)
    assert torch.allclose(uniform.probs, torch.full((1000,), 1e-3, dtype=torch.float64))


def test_run_demo_learns_the_facts():
    r = run_demo(DemoConfig(steps=300, **TINY), progress=False, report=False)
    mem, base = r["memory"], r["baseline"]
    for metrics in (mem, base):
        for key in ("loss", "recall", "recall_head", "recall_tail", "seen", "seconds"):
            assert math.isfinite(metrics[key]), key
    assert mem["recall"] > 0.6  # chance is 1/16
    assert mem["recall_head"] >= mem["recall_tail"]  # frequent facts are learned first
    assert mem["loss"] < 0.5 * math.log(16)
    assert base["flops_per_token"] == pytest.approx(mem["flops_per_token"], rel=0.02)  # FLOP-matched baseline
    assert mem["params"] > 2 * base["params"]  # many more parameters, not more FLOPs
    usage = r["usage"]
    assert usage["updates"] == 300 and usage["tokens_seen"] == 300 * 64
    for key in ("coverage", "coverage_ratio", "kl_unweighted", "usage_unweighted", "gini_unweighted", "dead_subkeys"):
        assert math.isfinite(usage[key]), key
    assert 0 < usage["coverage"] <= 1


def test_run_demo_is_deterministic_and_sparse_adam_runs():
    cfg = DemoConfig(steps=40, baseline=False, value_optimizer="sparse_adam", **TINY)
    a, b = (run_demo(cfg, progress=False, report=False) for _ in range(2))
    assert a["memory"]["loss"] == b["memory"]["loss"] and a["memory"]["recall"] == b["memory"]["recall"]
    assert "baseline" not in a and math.isfinite(a["memory"]["loss"])


@pytest.mark.parametrize(
    "overrides, match",
    [(dict(steps=0), "steps"), (dict(topk=32, n_keys=16), "topk"), (dict(preset="nope"), "preset"),
     (dict(value_optimizer="sgd"), "value_optimizer"), (dict(lr=0.0), "lr"), (dict(classes=1), "classes"),
     (dict(steps=1.5), r"^steps must be an integer, got 1.5 \(float\)$"), (dict(n_keys="16"), "n_keys must be an int"),
     (dict(baseline=0), r"baseline must be True or False, got 0 \(int\)"), (dict(lr="1e-3"), "lr must be a number"),
     (dict(threads=2.0), "threads must be an integer or None"), (dict(preset=None), "preset must be a string")],
)  # fmt: skip
def test_demo_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(**overrides)


def test_cli_demo_runs(capsys, tmp_path):
    out = tmp_path / "results.json"
    assert cli.main(["demo", *TINY_ARGS, "--steps", "30", "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recall, all facts" in text and "dense MLP" in text and "dead sub-keys" in text
    results = json.loads(out.read_text())
    assert results["config"]["steps"] == 30 and 0 <= results["memory"]["recall"] <= 1


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert memlayers.__version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["demo", "--steps", "0"], "--steps: must be a finite number >= 1"),
        (["demo", "--lr", "abc"], "--lr: expected a number"),
        (["demo", "--lr=-1e-3"], "--lr: must be a finite number > 0"),
        (["demo", "--zipf", "nan"], "--zipf"),
        (["demo", "--preset", "nope"], "invalid choice"),
        (["demo", "--value-optimizer", "sgd"], "invalid choice"),
        (["demo", "--n-keys", "8", "--topk", "16"], "topk must be <= n_keys"),
        (["demo", "--facts", "1.5"], "expected an integer"),
    ],
)
def test_cli_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
