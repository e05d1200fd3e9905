"""The training loop: exact resume (in-process and after SIGKILL), checkpoint errors, config mismatches,
finished-run reuse, gradient accumulation, the LR schedule, the JSONL log and load_checkpoint."""

import copy
import hashlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import memlayers.train.trainer as trainer_mod
from memlayers.train import (
    CheckpointError,
    ConfigMismatchError,
    load_checkpoint,
    load_config,
    lr_multiplier,
    read_checkpoint,
    train,
)
from memlayers.train.checkpoint import usage_state

MEMORY = "model.memories=[{layers: '1', preset: memory_plus, options: {n_keys: 16, topk: 4, heads: 2%s}}]"
TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=16",
    "data.facts.people=20",
    "data.facts.choices=10",
    "train.steps=10",
    "train.batch_size=4",
    "train.seq_len=16",
    "train.warmup=3",
    "train.log_every=1",
    "train.ckpt_every=4",
    "train.eval_every=0",
    "train.progress=false",
    "train.threads=1",
]
SPARSE = [MEMORY % ", sparse_values: true", "train.value_optimizer=sparse_adam"]
TIMING = ("elapsed", "tokens_per_s")


def tiny(*extra, sparse=False):
    return load_config(None, TINY + (SPARSE if sparse else [MEMORY % ""]) + list(extra))


def records(out_dir, timing=False):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(s).items() if timing or k not in TIMING} for s in lines]


def snapshot(out_dir):
    """{relative path: (sha256, mtime_ns)} of every file under out_dir."""
    return {
        str(p.relative_to(out_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name != ".memlayers.lock"  # the lock holder's pid is rewritten by every run
    }


def fake_eval(model, dataset, *, limit=None, batch_size=64, seq_len=128):
    """A small evaluate(): validation loss on fixed batches, plus a draw from the global RNG (which the
    trainer must restore, so evaluating cannot change training)."""
    assert not model.training
    with torch.no_grad():
        (x, y), *_ = dataset.val_batches(batch_size, seq_len, limit=batch_size)
        loss = model(x, y).loss.item()
    return {"loss": loss, "limit": -1 if limit is None else limit, "noise": torch.rand(()).item()}


class Interrupt(Exception):
    pass


def crash_at(monkeypatch, batch_index):
    """Make the next train() raise while fetching batch ``batch_index`` (= while taking step batch_index + 1)."""
    build = trainer_mod.build_dataset

    def build_crashing(cfg):
        ds = build(cfg)
        fetch = ds.train_batch

        def train_batch(step, *args):
            if step == batch_index:
                raise Interrupt(f"simulated crash at batch {step}")
            return fetch(step, *args)

        ds.train_batch = train_batch
        return ds

    monkeypatch.setattr(trainer_mod, "build_dataset", build_crashing)


def weights(out_dir):
    return read_checkpoint(out_dir)["model"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per value optimizer, with dropout (so resuming must restore the RNG) and
    periodic evaluations (which must not disturb it)."""
    runs = {}

    def get(sparse: bool):
        if sparse not in runs:
            out = tmp_path_factory.mktemp("sparse" if sparse else "dense")
            cfg = tiny("model.dropout=0.1", "train.eval_every=3", "train.eval_limit=7", sparse=sparse)
            runs[sparse] = (cfg, out, train(cfg, out, evaluate=fake_eval))
        return runs[sparse]

    return get


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["adamw", "sparse_adam"])
def test_resume_after_crash_equals_uninterrupted(reference, tmp_path, monkeypatch, sparse):
    cfg, ref_dir, ref = reference(sparse)
    crash_at(monkeypatch, 6)  # checkpoint at step 4, steps 5 and 6 logged (eval at 6), crash taking step 7
    with pytest.raises(Interrupt):
        train(cfg, tmp_path, evaluate=fake_eval)
    assert read_checkpoint(tmp_path)["step"] == 4 and not (tmp_path / "result.json").exists()
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 7))
    monkeypatch.undo()

    result = train(cfg, tmp_path, evaluate=fake_eval)
    assert records(tmp_path) == records(ref_dir)  # lines 5, 6 were dropped and redone: identical, exact floats
    assert [r["step"] for r in records(tmp_path)] == [*range(1, 11), 10]  # + the final evaluation's record
    assert result["final_loss"] == ref["final_loss"] and result["eval"] == ref["eval"]
    assert result["resumes"] == 1 and ref["resumes"] == 0
    assert_same_state(weights(tmp_path), weights(ref_dir))
    ckpt, ref_ckpt = read_checkpoint(tmp_path), read_checkpoint(ref_dir)
    for name, state in ref_ckpt["usage"].items():  # usage trackers (outside state_dict) resumed too
        assert state["updates"] == ckpt["usage"][name]["updates"] == 10
        for k in ("counts", "mass", "subkey_counts", "last_seen"):
            assert torch.equal(state[k], ckpt["usage"][name][k]), k
    if sparse:
        assert ckpt["optimizer"]["optimizers"][1]["state"]  # SparseRowAdam's moments were saved and restored


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    overrides = TINY + [MEMORY % "", "train.steps=14", "train.ckpt_every=3", "model.dropout=0.1"]
    cfg = load_config(None, overrides)
    ref = train(cfg, tmp_path / "ref", evaluate=False)
    script = f"""
import sys, time
import memlayers.train.trainer as T
from memlayers.train import load_config, train
build = T.build_dataset
def slow_build(cfg):  # a slow data loader, so the run is still going when it is killed
    ds = build(cfg)
    fetch = ds.train_batch
    ds.train_batch = lambda *a: (time.sleep(0.05), fetch(*a))[1]
    return ds
T.build_dataset = slow_build
train(load_config(None, {overrides!r}), sys.argv[1], evaluate=False)
"""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stderr=subprocess.PIPE)
    metrics, deadline = out / "metrics.jsonl", time.time() + 60
    try:
        while time.time() < deadline:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if any(json.loads(s)["step"] >= 7 for s in lines if s.endswith("}")):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        else:
            pytest.fail("the subprocess did not reach step 7 in 60 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists() and 6 <= read_checkpoint(out)["step"] < 14

    result = train(cfg, out, evaluate=False)
    assert records(out) == records(tmp_path / "ref")
    assert [r["step"] for r in records(out)] == list(range(1, 15))
    assert result["final_loss"] == ref["final_loss"] and result["resumes"] == 1
    assert_same_state(weights(out), weights(tmp_path / "ref"))
    assert not list(out.glob(".*.tmp.*"))


def test_evaluation_does_not_change_training(reference, tmp_path):
    cfg, ref_dir, _ = reference(False)
    train(cfg, tmp_path, evaluate=False)
    drop_eval = [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in records(ref_dir)]
    assert records(tmp_path) == [r for r in drop_eval if "loss" in r]
    evals = [r for r in records(ref_dir) if "eval/loss" in r]
    assert [(r["step"], r["eval/limit"]) for r in evals] == [(3, 7), (6, 7), (9, 7), (10, -1)]  # final: no limit


def test_jsonl_schema_and_result(reference):
    _cfg, ref_dir, ref = reference(False)
    rec = records(ref_dir, timing=True)
    assert [r["step"] for r in rec] == [*range(1, 11), 10]
    rec, final = rec[:-1], rec[-1]  # training records, then the final evaluation's own record
    assert set(final) == {"step", "tokens", "elapsed", "eval/loss", "eval/limit", "eval/noise"}
    assert final["eval/limit"] == -1 and final["elapsed"] >= rec[-1]["elapsed"]
    first = rec[0]
    assert set(first) == {"step", "tokens", "loss", "lr", "value_lr", "grad_norm", "value_grad_norm",
                          "tokens_per_s", "elapsed"}
    assert first["tokens"] == 4 * 16 and rec[-1]["tokens"] == 10 * 4 * 16
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and r["value_grad_norm"] > 0 for r in rec)
    assert all(a["elapsed"] <= b["elapsed"] for a, b in itertools.pairwise(rec))
    assert ref["final_loss"] == pytest.approx(sum(r["loss"] for r in rec[-5:]) / 5)
    assert ref["steps"] == 10 and ref["tokens"] == 640 and ref["eval"]["limit"] == -1
    assert ref["accounting"]["memory_params"] == 16 * 16 * 32 and ref["accounting"]["flops_per_token"] > 0
    assert json.loads((ref_dir / "result.json").read_text()) == ref
    assert load_config(ref_dir / "config.yaml").model.vocab_size == ref["config"]["model"]["vocab_size"] > 0
    # the value lr ratio is saved as the number used (10 for adamw), not as "the default"
    assert load_config(ref_dir / "config.yaml").train.value_lr_ratio == ref["config"]["train"]["value_lr_ratio"] == 10.0


def test_finished_run_is_reused_not_retrained(reference, tmp_path, capsys):
    cfg, ref_dir, ref = reference(False)
    before = snapshot(ref_dir)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was evaluated again")

    again = train(cfg, ref_dir, evaluate=must_not_run, progress=True)
    assert again == json.loads(json.dumps(ref)) and snapshot(ref_dir) == before
    assert f"finished already (step {ref['steps']}); its result is reused" in capsys.readouterr().err
    # runtime-only keys (progress bar, threads, tensorboard) may differ
    cfg = copy.deepcopy(cfg)
    cfg.train.progress, cfg.train.threads = True, 2
    assert train(cfg, ref_dir, evaluate=must_not_run, progress=False) == again and snapshot(ref_dir) == before


def test_force_restarts_and_keeps_the_old_result(tmp_path):
    cfg = tiny("train.steps=3")
    first = train(cfg, tmp_path, evaluate=False)
    cfg2 = tiny("train.steps=4", "train.seed=1")  # a larger train.steps alone would extend the run
    with pytest.raises(ConfigMismatchError, match="train.seed: saved 0, requested 1"):
        train(cfg2, tmp_path, evaluate=False)
    second = train(cfg2, tmp_path, evaluate=False, force=True)
    assert second["steps"] == 4 and second["resumes"] == 0
    assert json.loads((tmp_path / "prev" / "0" / "result.json").read_text()) == json.loads(json.dumps(first))
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]
    train(tiny("train.steps=2"), tmp_path, evaluate=False, force=True)  # a second force keeps both archives
    assert json.loads((tmp_path / "prev" / "1" / "result.json").read_text())["steps"] == 4
    assert (tmp_path / "prev" / "0" / "result.json").exists()


def test_mismatched_config_is_refused_and_nothing_is_touched(tmp_path, monkeypatch):
    cfg = tiny()
    crash_at(monkeypatch, 5)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path, evaluate=False)
    monkeypatch.undo()
    before = snapshot(tmp_path)
    other = tiny("train.lr=3e-3", "model.dim=64")
    with pytest.raises(ConfigMismatchError) as e:
        train(other, tmp_path, evaluate=False)
    msg = str(e.value)
    assert "2 key(s) differ" in msg and "model.dim: saved 32, requested 64" in msg and "train.lr" in msg
    assert "force" in msg and snapshot(tmp_path) == before

    # killed before its first checkpoint: config.yaml is still checked
    (tmp_path / "checkpoint.pt").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigMismatchError, match="config.yaml"):
        train(other, tmp_path, evaluate=False)
    assert snapshot(tmp_path) == before
    # ... and the same config starts over cleanly
    train(cfg, tmp_path, evaluate=False)
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 11))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, monkeypatch, damage):
    cfg = tiny()
    crash_at(monkeypatch, 5)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path, evaluate=False)
    monkeypatch.undo()
    path = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    else:
        torch.save({"model": {}}, path)
    before = snapshot(tmp_path)
    expected = "not a memlayers checkpoint" if damage == "foreign" else "truncated, corrupt"
    with pytest.raises(CheckpointError, match=expected):
        train(cfg, tmp_path, evaluate=False)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    assert snapshot(tmp_path) == before


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")


def test_load_checkpoint_rebuilds_the_trained_model(reference):
    _cfg, ref_dir, ref = reference(True)
    loaded_cfg, model, extra = load_checkpoint(ref_dir / "checkpoint.pt")
    assert loaded_cfg.to_dict() == ref["config"] and not model.training
    assert extra["step"] == 10 and extra["tokens"] == 640
    assert_same_state(model.state_dict(), weights(ref_dir))
    state = usage_state(model)
    assert len(state) == 1 and next(iter(state.values()))["updates"] == 10  # usage statistics restored
    x = torch.randint(0, loaded_cfg.model.vocab_size, (2, 16))
    assert torch.isfinite(model(x).logits).all()


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    big = train(tiny("train.steps=4", "train.batch_size=4"), tmp_path / "big", evaluate=False)
    acc = train(tiny("train.steps=4", "train.batch_size=2", "train.grad_accum=2"), tmp_path / "acc", evaluate=False)
    assert big["tokens"] == acc["tokens"] == 4 * 4 * 16
    for a, b in zip(records(tmp_path / "acc"), records(tmp_path / "big")):
        for k in ("loss", "grad_norm", "value_grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    wa, wb = weights(tmp_path / "acc"), weights(tmp_path / "big")
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    # not vacuous: a different split of the data would not match
    other = train(tiny("train.steps=4", "train.batch_size=2"), tmp_path / "half", evaluate=False)
    assert abs(other["final_loss"] - big["final_loss"]) > 1e-4


def test_lr_schedule():
    assert [lr_multiplier(s, 10, 4, 0.1) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_multiplier(10, 10, 4, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(7, 10, 4, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(1, 10, 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    mults = [lr_multiplier(s, 10, 4, 0.1) for s in range(4, 11)]
    assert all(a > b for a, b in itertools.pairwise(mults))  # monotone decay after the peak


def test_lr_schedule_in_a_run(tmp_path):
    cfg = tiny("train.steps=10", "train.warmup=4", "train.min_lr_ratio=0.1", "train.lr=2e-3", "train.value_lr_ratio=10")
    train(cfg, tmp_path, evaluate=False)
    lr = {r["step"]: (r["lr"], r["value_lr"]) for r in records(tmp_path)}
    for step, mult in ((1, 0.25), (4, 1.0), (7, lr_multiplier(7, 10, 4, 0.1)), (10, 0.1)):
        assert lr[step][0] == pytest.approx(2e-3 * mult) and lr[step][1] == pytest.approx(2e-2 * mult), step
    # the optimizer itself holds those values: the last step's group lrs, per group
    groups = {g["name"]: g["lr"] for g in read_checkpoint(tmp_path)["optimizer"]["param_groups"]}
    assert groups["values"] == pytest.approx(2e-3 * 0.1 * 10) and groups["decay"] == pytest.approx(2e-3 * 0.1)
    assert groups["subkeys"] == groups["no_decay"] == groups["decay"]


def test_bad_run_settings_fail_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="train.seq_len=32 exceeds model.max_seq_len=16"):
        train(tiny("train.seq_len=32"), out, evaluate=False)
    with pytest.raises(ValueError, match="model.vocab_size=5 is smaller"):
        train(tiny("model.vocab_size=5"), out, evaluate=False)
    with pytest.raises(TypeError, match="RunConfig"):
        train({"train": {}}, out)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            train(tiny("train.tensorboard=true"), out, evaluate=False)
    assert not out.exists()


def test_crash_between_last_checkpoint_and_result(tmp_path, monkeypatch):
    import memlayers.accounting

    cfg = tiny("train.steps=3")
    calls = []

    def counting_eval(*args, **kwargs):
        calls.append(kwargs["limit"])
        return fake_eval(*args, **kwargs)

    def broken_account(*args):
        raise Interrupt("killed while writing the result")

    monkeypatch.setattr(memlayers.accounting, "account", broken_account)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path, evaluate=counting_eval)
    assert read_checkpoint(tmp_path)["step"] == 3 and not (tmp_path / "result.json").exists()
    monkeypatch.undo()
    result = train(cfg, tmp_path, evaluate=counting_eval)
    assert calls == [None]  # the final evaluation was saved with the last checkpoint, not redone
    assert result["resumes"] == 1 and result["eval"]["limit"] == -1 and result["steps"] == 3
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 3]


def test_a_crash_in_the_final_evaluation_loses_no_training(tmp_path):
    cfg = tiny("train.steps=3")

    def crashing_eval(*args, **kwargs):
        raise Interrupt("killed during the final evaluation")

    with pytest.raises(Interrupt):
        train(cfg, tmp_path, evaluate=crashing_eval)
    assert read_checkpoint(tmp_path)["step"] == 3  # the training was checkpointed before evaluating
    before = weights(tmp_path)
    result = train(cfg, tmp_path, evaluate=fake_eval)
    assert result["steps"] == 3 and result["eval"]["limit"] == -1
    assert_same_state(weights(tmp_path), before)  # no step was redone
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 3]


def test_problems_found_before_anything_is_written_or_archived(tmp_path):
    with pytest.raises(ValueError, match=r"raise model.max_seq_len to >= \d+"):  # bios probes need a longer context
        train(tiny(), tmp_path / "a")  # the default evaluator runs the recall probes
    assert not (tmp_path / "a").exists()
    first = train(tiny("train.steps=2"), tmp_path / "b", evaluate=False)
    before = snapshot(tmp_path / "b")
    with pytest.raises(ValueError, match="sparse_adam"):  # the optimizer cannot be built: force must not archive
        train(tiny("train.value_optimizer=sparse_adam"), tmp_path / "b", evaluate=False, force=True)
    assert snapshot(tmp_path / "b") == before and first["steps"] == 2
