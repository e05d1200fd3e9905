"""``torchrun -m memlayers train`` on 2 and 4 CPU processes (gloo): the losses of one process, a sharded
checkpoint that resumes on another number of processes (and exports to safetensors), and a killed rank
restarted by torchrun with nothing lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from memlayers.train import CheckpointError, read_checkpoint

CONFIG = [
    "model.dim=32", "model.n_layers=3", "model.n_heads=2", "model.max_seq_len=64",
    (
        "model.memories=[{layers: '0,2', pool: values, options: {n_keys: 16, topk: 4, heads: 2, query_norm: batchnorm}},"
        " {layers: '1', preset: peer, options: {n_keys: 6, topk: 3, heads: 2}}]"
    ),
    "data.facts.people=20", "data.facts.choices=10",
    "train.steps=8", "train.batch_size=4", "train.seq_len=16", "train.warmup=3", "train.log_every=1",
    "train.ckpt_every=3", "train.eval_every=0", "train.progress=false", "train.threads=1",
]  # fmt: skip
SPARSE = [
    "model.memories=[{layers: '0,1', pool: values, options: {n_keys: 16, topk: 4, heads: 2, sparse_values: true}}]",
    "train.value_optimizer=sparse_adam",
]


def launch(out, procs: int, *overrides, script=None, wait=True):
    """``memlayers train`` in one process, or under torchrun in ``procs``."""
    target = [script] if script else ["-m", "memlayers"]
    if procs == 1:
        cmd = [sys.executable, *target, "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        cmd += ["--max-restarts=1", *target, "train"]
    cmd += ["--out", str(out), *CONFIG, *overrides]
    if not wait:  # in its own process group, so that a failed test can stop torchrun's workers too
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def shard_dirs(out) -> list[str]:
    return sorted(f"checkpoints/{p.name}" for p in (out / "checkpoints").glob("*"))


def logged(out, key="loss"):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def assert_close(a: dict, b: dict, exact_until: int = 3):
    """Equal up to float rounding (1e-5) for the steps up to ``exact_until``, within 2e-3 after: sums in another
    order move the weights by ~1e-6, and a top-k selection is discontinuous, so a near-tie between a token's
    k-th and (k+1)-th slot can go the other way a few steps later (measured: 3e-4 at the second step after a
    resume, from value-state differences of 5e-9)."""
    assert a.keys() == b.keys()
    for step, value in a.items():
        tol = 1e-5 if step <= exact_until else 2e-3
        assert abs(value - b[step]) <= tol * abs(b[step]), (step, value, b[step])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    launch(out, 1)
    return out


@pytest.mark.parametrize(
    "procs, layout",
    [(2, []), (4, ["parallel.memory=2", "parallel.sharding=row"]), (2, ["parallel.memory=2", "train.compile=true"])],
    ids=["data-parallel", "4-procs-rows", "memory-parallel-columns-compiled"],
)
def test_torchrun_losses_equal_one_process(tmp_path, one_process, procs, layout):
    """``train.batch_size`` is the global batch: the same losses and gradient norms as one process (batch-norm
    statistics, the MoE-free losses and every gradient are exact; only the order of float sums differs), also
    with the model compiled (``train.compile``)."""
    launch(tmp_path / "run", procs, *layout)
    for key in ("loss", "grad_norm", "value_grad_norm"):
        assert_close(logged(tmp_path / "run", key), logged(one_process, key))
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    expected = json.loads((one_process / "metrics.jsonl").read_text().splitlines()[-1])
    evaluated = [k for k in expected if k.startswith("eval/")]
    assert "eval/memory/0/tokens_seen" in evaluated  # the usage trackers count every rank's tokens
    for key in evaluated:
        assert abs(final[key] - expected[key]) <= 1e-3 * max(1.0, abs(expected[key])), key
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 8 and result["config"]["parallel"]["memory"] == (2 if layout else 1)


def test_sparse_values_train_under_data_parallelism(tmp_path):
    """The row-sparse value path (SparseRowAdam) on 2 processes, data-parallel and memory-parallel by rows."""
    launch(tmp_path / "one", 1, *SPARSE)
    for name, layout in (("dp", []), ("rows", ["parallel.memory=2", "parallel.sharding=row"])):
        launch(tmp_path / name, 2, *SPARSE, *layout)
        assert_close(logged(tmp_path / name), logged(tmp_path / "one"))


def test_fused_value_update_under_torchrun(tmp_path):
    """train.fused_values=true (the update from the backward's pieces): data-parallel (every replica's pieces
    gathered) and memory-parallel by rows (each shard's own) give one process's losses and value norms."""
    fused = [*SPARSE, "train.fused_values=true", "train.value_clip=null"]
    launch(tmp_path / "one", 1, *fused)
    for name, layout in (("dp", []), ("rows", ["parallel.memory=2", "parallel.sharding=row"])):
        launch(tmp_path / name, 2, *fused, *layout)
        for key in ("loss", "value_grad_norm"):
            assert_close(logged(tmp_path / name, key), logged(tmp_path / "one", key))


def test_checkpoint_of_2_processes_resumes_on_1_and_on_4(tmp_path, one_process):
    """Saved sharded by 2 processes (DCP: each writes its part), extended on 1 process and on 4 with another
    memory group size; one process's checkpoint extended on 2: the steps after the checkpoint have the losses
    of a run that never stopped. The run directory keeps one shard directory, the last checkpoint's."""
    first = tmp_path / "two"
    launch(first, 2, "train.steps=5", "parallel.memory=2")
    ckpt = read_checkpoint(first)
    assert "model" not in ckpt and "optimizer" not in ckpt
    assert shard_dirs(first) == [ckpt["shards"]["dir"]]  # older ones removed; the final save reused step 5's
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(ckpt["shards"]["files"])
    reference = tmp_path / "ref"  # the same schedule: 5 steps, then extended to 8
    launch(reference, 1, "train.steps=5")
    whole = tmp_path / "whole"
    shutil.copytree(reference, whole)
    launch(reference, 1)
    for procs, source, layout in (
        (1, first, []),
        (4, first, ["parallel.memory=4", "parallel.sharding=row"]),
        (2, whole, ["parallel.memory=2"]),
    ):
        out = tmp_path / f"resumed-{procs}"
        shutil.copytree(source, out)
        launch(out, procs, *layout)
        assert_close(logged(out), logged(reference), exact_until=6)  # the next step's loss is one process's
        assert json.loads((out / "result.json").read_text())["steps_history"] == [5, 8]
        assert shard_dirs(out) == ([] if procs == 1 else [read_checkpoint(out)["shards"]["dir"]])


def test_damaged_shards_are_refused_and_the_model_exports_to_safetensors(tmp_path):
    """A flipped byte in one process's shard file: resuming (on 2) and evaluating (on 1) stop with one line naming
    it. An intact sharded checkpoint exports to one safetensors file holding one process's model, and starts a
    new run on 2 processes (train.init_from)."""
    from memlayers.train import load_checkpoint
    from memlayers.train.export import export_safetensors

    run = tmp_path / "run"
    launch(run, 2, "train.steps=3", "parallel.memory=2", "parallel.sharding=row")
    _, model, extra = load_checkpoint(run)
    _, exported, _ = load_checkpoint(export_safetensors(run, tmp_path / "m.safetensors"))
    for (name, a), b in zip(model.state_dict().items(), exported.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert extra["step"] == 3
    started = tmp_path / "started"  # a new run under torchrun from the sharded run's weights (each process reads them)
    launch(started, 2, "train.steps=1", "train.lr=1e-12", "train.warmup=0", f"train.init_from={run}")
    weights = dict(load_checkpoint(started)[1].named_parameters())  # (buffers: batch-norm statistics moved on)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-6, msg=name)
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    shard = damaged / read_checkpoint(damaged)["shards"]["dir"] / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "memlayers"]
    done = subprocess.run(
        [*cmd, "train", "--out", str(damaged), *CONFIG, "train.steps=5", "parallel.memory=2"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "memlayers train: error: " in done.stderr and "__1_0.distcp fails its checksum" in done.stderr
    with pytest.raises(CheckpointError, match=r"damaged sharded checkpoint \(__1_0.distcp fails its checksum\)"):
        load_checkpoint(damaged)


def test_a_killed_rank_is_restarted_and_resumes(tmp_path, one_process):
    """SIGKILL to one of two workers mid-run: torchrun restarts both (--max-restarts=1), they resume from the
    last checkpoint, and every step is logged once with the uninterrupted run's loss."""
    script = tmp_path / "slow_train.py"
    script.write_text(
        "import time\n"
        "import memlayers.train.trainer as T\n"
        "from memlayers.cli import main\n"
        "build = T.build_dataset\n"
        "def slow_build(cfg):  # a slow data loader, so the run is still going when a rank is killed\n"
        "    ds = build(cfg)\n"
        "    fetch = ds.train_batch\n"
        "    ds.train_batch = lambda *a: (time.sleep(0.3), fetch(*a))[1]\n"
        "    return ds\n"
        "T.build_dataset = slow_build\n"
        "raise SystemExit(main())\n"
    )
    out = tmp_path / "run"
    proc = launch(out, 2, script=str(script), wait=False)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and max(logged(out), default=0) >= 4:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("the run did not reach step 4 in 120 s")
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    result = json.loads((out / "result.json").read_text())
    assert result["resumes"] == 1
    assert_close(logged(out), logged(one_process))
    steps = [json.loads(s)["step"] for s in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in s]
    assert steps == list(range(1, 9))


def test_layouts_that_cannot_work_are_refused_with_one_line(tmp_path):
    """Before anything is written: memory groups without torchrun, a group size that does not divide the
    processes, a batch that does not split over them, row-wise Adagrad's per-row state by columns."""
    from memlayers.train import load_config, train

    with pytest.raises(
        ValueError, match=r"parallel.memory=2 shards the value tables over 2 processes, but this is one"
    ):
        train(load_config(None, [*CONFIG, "parallel.memory=2"]), tmp_path / "one", evaluate=False)
    assert not (tmp_path / "one").exists()
    with pytest.raises(ValueError, match="cannot shard row-wise Adagrad's per-row state"):
        load_config(None, [*CONFIG, *SPARSE, "train.value_optimizer=sparse_adagrad", "parallel.memory=2"])
    for overrides, message in (
        (["parallel.memory=4"], "parallel.memory=4 does not divide the 2 processes"),
        (["train.batch_size=3"], "train.batch_size=3 (the global batch) does not split over 2 processes"),
    ):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "memlayers"]
        done = subprocess.run(
            [*cmd, "train", "--out", str(tmp_path / "two"), *CONFIG, *overrides],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
        assert "memlayers train: error: " in done.stderr
