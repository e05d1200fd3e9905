"""Nothing is lost and nothing goes silently wrong: diverged runs, busy and bad run directories, damaged
checkpoints, full disks, edited configs, Ctrl-C, extending a finished run and starting from another's weights."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from test_train import TINY, records, snapshot, tiny

import memlayers.train.trainer as trainer_mod
from memlayers import cli
from memlayers.train import CheckpointError, ConfigMismatchError, load_checkpoint, lr_multiplier, read_checkpoint, train
from memlayers.train.checkpoint import NonFiniteError, atomic_write, nonfinite
from memlayers.train.lock import RunDirBusyError, lock_run_dir

CLI_TINY = [a for a in TINY if not a.startswith("train.progress")] + [
    "data.facts.formats=records",
    "model.memories=[{layers: '1', preset: memory_plus, options: {n_keys: 16, topk: 4, heads: 2}}]"
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_records(out_dir):
    """metrics.jsonl parsed by a strict parser (NaN/Infinity are not JSON)."""

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def poison_weights_after(monkeypatch, step):
    """Make the run diverge: after optimizer step ``step`` a weight becomes NaN (as a too-large lr does)."""
    original = trainer_mod._Run._train_step

    def train_step(self, forward):
        out = original(self, forward)
        if self.step + 1 == step:
            with torch.no_grad():
                self.model.tok_emb.weight[0, 0] = float("nan")
        return out

    monkeypatch.setattr(trainer_mod._Run, "_train_step", train_step)


# ---- a diverged run


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_weights_after(monkeypatch, 6)  # steps 1-6 finite (checkpoint at 4), the loss of step 7 is NaN
    with pytest.raises(NonFiniteError, match=r"diverged.*at step 7.*checkpoint \(step 4\) is kept"):
        train(tiny(), out, evaluate=False)
    ckpt = read_checkpoint(out)
    assert ckpt["step"] == 4 and not nonfinite(ckpt["model"]) and not nonfinite(ckpt["optimizer"])
    assert [r["step"] for r in strict_records(out)] == [1, 2, 3, 4, 5, 6]  # nothing non-finite was logged
    assert not (out / "result.json").exists()


def test_a_diverged_run_before_its_first_checkpoint(tmp_path, monkeypatch):
    poison_weights_after(monkeypatch, 1)
    with pytest.raises(NonFiniteError, match="no checkpoint was written"):
        train(tiny(), tmp_path / "run", evaluate=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_too_large_lr_exits_non_zero_with_one_line(tmp_path, capsys):
    args = ["train", "--quiet", "--out", str(tmp_path / "run"), *CLI_TINY]
    assert cli.main([*args, "train.lr=1000", "train.clip=null", "train.value_clip=null"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("memlayers train: error: training diverged") and "\n" not in err
    assert not (tmp_path / "run" / "result.json").exists()
    strict_records(tmp_path / "run")


def test_save_checkpoint_refuses_non_finite_state(tmp_path):
    from memlayers.train.checkpoint import save_checkpoint

    good = {k: {} for k in ("config", "rng", "usage", "trainer")} | {"step": 1, "tokens": 1, "optimizer": {}}
    save_checkpoint(tmp_path / "c.pt", {**good, "model": {"w": torch.ones(2)}})
    before = (tmp_path / "c.pt").read_bytes()
    with pytest.raises(NonFiniteError, match="w"):
        save_checkpoint(tmp_path / "c.pt", {**good, "model": {"w": torch.tensor([1.0, float("inf")])}})
    assert (tmp_path / "c.pt").read_bytes() == before


# ---- one process per run directory, and only our own temporary files


def test_a_busy_run_directory_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from memlayers.train.lock import lock_run_dir\n"
         f"with lock_run_dir({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            train(tiny(), out, evaluate=False)
        assert sorted(p.name for p in out.iterdir()) == [".memlayers.lock"]
    finally:
        holder.kill()
        holder.wait()
    train(tiny(), out, evaluate=False)  # the lock died with its holder


def test_stale_cleanup_deletes_only_our_temporaries(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ours, users = out / ".checkpoint.pt.tmp.12345", [out / ".notes.tmp.1", out / ".checkpoint.pt.tmp.backup"]
    for p in (ours, *users):
        p.write_text("x")
    train(tiny(), out, evaluate=False)
    assert not ours.exists() and all(p.read_text() == "x" for p in users)


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with lock_run_dir(tmp_path), pytest.raises(RunDirBusyError, match=str(os.getpid())):
        with lock_run_dir(tmp_path):
            pass


# ---- damaged checkpoints, bad paths, failed writes


def test_flipped_bytes_in_tensor_data_are_refused(tmp_path):
    out = tmp_path / "run"
    train(tiny(), out, evaluate=False)
    path = out / "checkpoint.pt"
    with zipfile.ZipFile(path) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data = bytearray(path.read_bytes())
    data[start + member.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checksum mismatch in {member.filename}.*restore a good copy"):
        load_checkpoint(out)


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert cli.main(["train", "--quiet", "--out", str(tmp_path / "f"), *CLI_TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a file" in err and "\n" not in err
    assert (tmp_path / "f").read_text() == "mine"


def test_a_failed_write_names_the_real_cause(tmp_path, monkeypatch):
    def fail(f):
        raise OSError(30, "Read-only file system")

    real_unlink = os.unlink

    def unlink(path, *a, **k):  # on a read-only file system the cleanup fails too
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(OSError, match=r"cannot write .*x\.bin: Read-only file system"):
        atomic_write(tmp_path / "x.bin", fail)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert not (tmp_path / "x.bin").exists()


def test_a_full_disk_is_one_line_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--quiet", "--out", str(out), *CLI_TINY, "train.steps=4"]
    assert cli.main(args) == 0
    good = (out / "checkpoint.pt").read_bytes()
    # the checkpoint no longer fits: writes past 64 kB fail as they would on a full disk (EFBIG, not ENOSPC)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
        from memlayers.cli import main
        sys.exit(main({[*args[:-1], "train.steps=8"]!r}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2, run.stderr
    err = run.stderr.strip()
    assert err.startswith("memlayers train: error: cannot write") and "checkpoint.pt" in err and "\n" not in err
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not [p for p in out.iterdir() if ".tmp." in p.name]


# ---- config.yaml is a record


def test_deleted_config_yaml_is_rewritten_and_an_edited_one_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny("train.steps=8")
    with pytest.raises(KeyboardInterrupt):
        train_until_ctrl_c(monkeypatch, cfg, out, 6)  # checkpoint at step 4
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").unlink()
    with pytest.raises(KeyboardInterrupt):
        train_until_ctrl_c(monkeypatch, cfg, out, 7)  # resumes from step 4
    assert (out / "config.yaml").read_text() == text
    (out / "config.yaml").write_text(text.replace("lr: 0.001", "lr: 0.5"))
    before = snapshot(out)
    with pytest.raises(ConfigMismatchError, match=r"config.yaml was edited \(train.lr\)"):
        train(cfg, out, evaluate=False)
    assert snapshot(out) == before
    (out / "config.yaml").write_text(text)
    assert train(cfg, out, evaluate=False)["steps"] == 8


def train_until_ctrl_c(monkeypatch, cfg, out, step):
    """Train ``cfg`` in ``out``; Ctrl-C arrives during step ``step``."""
    original = trainer_mod._Run._train_step

    def train_step(self, forward):
        if self.step + 1 == step:
            raise KeyboardInterrupt
        return original(self, forward)

    with monkeypatch.context() as m:
        m.setattr(trainer_mod._Run, "_train_step", train_step)
        train(cfg, out, evaluate=False)


# ---- the command line


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--quiet", "--out", str(out), *CLI_TINY, "train.steps=10"]
    with monkeypatch.context() as m:
        original = trainer_mod._Run._train_step
        m.setattr(trainer_mod._Run, "_train_step",
                  lambda self, fwd: (_ for _ in ()).throw(KeyboardInterrupt) if self.step == 6 else original(self, fwd))
        assert cli.main(args) == 130
    err = capsys.readouterr().err.strip()
    assert err == "memlayers train: interrupted at step 6 of 10; rerun the same command to resume exactly from step 4"
    assert cli.main(args) == 0


def test_progress_false_is_honoured_and_overrides_may_follow_options(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(trainer_mod, "_Run", _Spy(seen))
    out = str(tmp_path / "run")
    assert cli.main(["train", "--out", out, *CLI_TINY, "train.progress=false"]) == 0
    assert seen["show"] is False
    assert cli.main(["train", "--out", out + "2", "train.progress=true", "--quiet", *CLI_TINY]) == 0
    assert seen["show"] is False
    assert cli.main(["train", "--out", out + "3", *CLI_TINY, "train.progress=true"]) == 0
    assert seen["show"] is True
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", out, "--quiet", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


class _Spy:
    """Stands in for trainer._Run: records ``show`` and returns a fake result."""

    def __init__(self, seen):
        self.seen = seen

    def __call__(self, cfg, out_dir, dataset, device, dtype, evaluate, show, ckpt, init):
        self.seen["show"] = show
        return self

    def run(self):
        return {"steps": 0, "tokens": 0, "final_loss": None, "tokens_per_s": None, "wall_time": 0.0, "eval": {}}


def test_typo_with_several_close_matches(capsys):
    assert cli.main(["train", "--print-config", "train.stpes=10"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train.steps' or 'train.dtype'?" in err
    assert cli.main(["compare", "--arms", "dense", "train.stpes=10"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "foo", "cuda:7"])
def test_eval_on_a_bad_device_is_one_line(tmp_path, capsys, device):
    out = tmp_path / "run"
    assert cli.main(["train", "--quiet", "--out", str(out), *CLI_TINY, "train.steps=2"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"memlayers eval: error: --device: {device!r}") and "\n" not in err


def test_a_closed_pipe_is_not_a_traceback():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as with `| head -0`
    run = subprocess.run([sys.executable, "-m", "memlayers.cli", "compare", "--list"], stdout=write,
                         stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)  # fmt: skip
    os.close(write)
    assert run.stderr == "" and run.returncode == 141


# ---- extending a run, starting from another run's weights


def test_extending_a_finished_run(tmp_path):
    out = tmp_path / "run"
    first = train(tiny("train.steps=8"), out, evaluate=False)
    with pytest.raises(ConfigMismatchError, match="train.steps=6 but the run was set to 8 steps.*not shortened"):
        train(tiny("train.steps=6"), out, evaluate=False)
    result = train(tiny("train.steps=12"), out, evaluate=False)
    assert result["steps"] == 12 and result["steps_history"] == [8, 12] and result["resumes"] == 1
    assert json.loads((out / "prev" / "0" / "result.json").read_text())["steps"] == 8 == first["steps"]
    assert "steps: 12" in (out / "config.yaml").read_text()
    lrs = {r["step"]: r["lr"] for r in records(out)}
    assert [r["step"] for r in records(out)] == list(range(1, 13))
    for step in range(9, 13):  # after the old end, the schedule of the new length
        assert lrs[step] == pytest.approx(1e-3 * lr_multiplier(step, 12, 3, 0.1))
    assert train(tiny("train.steps=12"), out, evaluate=False)["steps"] == 12  # finished again: reused


def test_init_from_another_runs_weights(tmp_path):
    a = tmp_path / "a"
    train(tiny("train.steps=4"), a, evaluate=False)
    _, model_a, _ = load_checkpoint(a)
    b = tmp_path / "b"
    train(tiny("train.steps=1", "train.lr=1e-12", "train.warmup=0", f"train.init_from={a}"), b, evaluate=False)
    _, model_b, extra = load_checkpoint(b)
    assert extra["step"] == 1
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(CheckpointError, match=r"init_from=.*model\.dim"):
        train(tiny("model.dim=48", f"train.init_from={a}"), tmp_path / "c", evaluate=False)
    assert not (tmp_path / "c").exists()  # a new run's init_from is checked before anything is written
    with pytest.raises(FileNotFoundError, match="train.init_from: no checkpoint at"):
        train(tiny(f"train.init_from={tmp_path / 'nope'}"), tmp_path / "d", evaluate=False)


def test_runs_saved_before_new_config_keys_still_resume():
    from memlayers.train import config_diff

    new = tiny().to_dict()
    old = tiny().to_dict()
    del old["train"]["init_from"], old["data"]["text"]["chunk_tokens"], old["data"]["order_seed"]
    assert config_diff(old, new) == []  # a facts run: the text section does not matter
    text_new = {**new, "data": {**new["data"], "kind": "text"}}
    text_old = {**old, "data": {**old["data"], "kind": "text"}}
    # an old text run read whole files (chunk_tokens=0); the new default would change its batches
    assert config_diff(text_old, text_new) == [("data.text.chunk_tokens", 0, 4096)]


def _drop_new_keys(out):
    """Make ``out`` look saved by the memlayers before ``train.init_from`` existed."""
    if (out / "result.json").exists():
        result = json.loads((out / "result.json").read_text())
        del result["config"]["train"]["init_from"]
        (out / "result.json").write_text(json.dumps(result))
    ckpt = read_checkpoint(out)
    del ckpt["config"]["train"]["init_from"]
    torch.save(dict(ckpt), out / "new.pt")  # not onto the file: read_checkpoint memory-maps it
    os.replace(out / "new.pt", out / "checkpoint.pt")
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text("\n".join(line for line in text.splitlines() if "init_from" not in line) + "\n")


def test_a_run_saved_before_init_from_existed_is_reused_and_extended(tmp_path):
    out = tmp_path / "run"
    first = train(tiny("train.steps=4"), out, evaluate=False)
    _drop_new_keys(out)
    assert train(tiny("train.steps=4"), out, evaluate=False)["steps"] == first["steps"] == 4
    assert train(tiny("train.steps=6"), out, evaluate=False)["steps"] == 6


def test_an_interrupted_extension_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny("train.steps=8"), out, evaluate=False)
    with pytest.raises(KeyboardInterrupt):
        train_until_ctrl_c(monkeypatch, tiny("train.steps=12"), out, 10)  # config.yaml says 12, the checkpoint 8
    result = train(tiny("train.steps=12"), out, evaluate=False)
    assert result["steps"] == 12 and [r["step"] for r in records(out)] == list(range(1, 13))


def test_init_from_is_read_only_when_a_run_starts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny("train.steps=2"), a, evaluate=False)
    cfg = tiny("train.steps=2", f"train.init_from={a}")
    train(cfg, b, evaluate=False)
    for p in a.iterdir():
        p.unlink()
    assert train(cfg, b, evaluate=False)["steps"] == 2  # finished: the source is not needed any more


def test_a_finished_run_rewrites_a_deleted_config_yaml(tmp_path):
    out = tmp_path / "run"
    train(tiny("train.steps=2"), out, evaluate=False)
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").unlink()
    train(tiny("train.steps=2"), out, evaluate=False)
    assert (out / "config.yaml").read_text() == text


def test_a_second_compare_on_the_same_directory_stops(tmp_path):
    from memlayers.compare import run_compare

    with lock_run_dir(tmp_path), pytest.raises(RunDirBusyError, match=str(os.getpid())):
        run_compare("cpu", str(tmp_path), arms=["dense"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".memlayers.lock"]


def test_the_lock_is_skipped_on_a_read_only_file_system(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "open", read_only)
    with lock_run_dir(tmp_path):
        pass


def test_a_failed_plot_does_not_cost_the_finished_run(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(trainer_mod, "write_curves", broken)
    with pytest.warns(UserWarning, match="curves.png not written: RuntimeError: no fonts"):
        assert train(tiny("train.steps=2"), tmp_path / "run", evaluate=False)["steps"] == 2
    assert (tmp_path / "run" / "result.json").exists()
