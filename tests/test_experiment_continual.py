"""``memlayers experiment continual`` on a tiny task: every arm over two seeds, the table and plot, reuse of
finished runs, the lr choice, and bad input."""

import json

import pytest
import torch

pytest.importorskip("peft")

from memlayers.cli import main  # noqa: E402
from memlayers.experiments import continual  # noqa: E402
from memlayers.experiments.continual import ARMS, ContinualTask, choose_lr, run_continual  # noqa: E402


def tiny_task(**changes) -> ContinualTask:
    settings = dict(
        old_people=12, new_people=4, heldout_people=4, choices=20, dim=32, memory=dict(n_keys=16, heads=2, topk=4),
        pretrain_steps=8, batch_size=8, seq_len=32, background_batches=4, finetune_steps=4, finetune_batch_size=4,
        eval_every=2, check_every=2, top_t=16,
        lrs={"full": [1e-3, 3e-3], "lora": [3e-3], "memory": [1e-2], "sparse_memory": [3e-2]},
    )  # fmt: skip
    return ContinualTask(**{**settings, **changes})


def test_every_arm_runs_over_seeds_and_finished_runs_are_reused(tmp_path, monkeypatch):
    rows = run_continual(str(tmp_path), seeds=2, show=False, task=tiny_task())
    assert [r["arm"] for r in rows] == list(ARMS) and all(r["seeds"] == 2 for r in rows)
    for row in rows:
        assert 0 <= row["new_recall"] <= 1 and row["steps"] in (2, 4) and row["trainable"] > 0
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["memory"]["trainable"] == by_arm["sparse_memory"]["trainable"] == 256 * 32  # the value table only
    assert by_arm["lora"]["trainable"] < by_arm["memory"]["trainable"] < by_arm["full"]["trainable"]
    # seed 0 tried the grid (extended past a winning edge); seed 1 ran only at the lr seed 0 chose
    saved = json.loads((tmp_path / "results.json").read_text())
    names = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"lr0.001.seed0.json", "lr0.003.seed0.json"} <= names and len(names) >= 3
    assert {n for n in names if n.endswith("seed1.json")} == {f"lr{saved['lrs']['full']:g}.seed1.json"}
    assert set(saved["lrs"]) == set(ARMS) and saved["pretrained"]["seeds"] == 2
    assert "| sparse_memory |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "learning_vs_forgetting.png").stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(continual, "finetune", no_training)
    monkeypatch.setattr(continual, "build_optimizer", no_training)  # pretraining too
    assert run_continual(str(tmp_path), seeds=2, show=False, task=tiny_task())[0]["new_recall"] == rows[0]["new_recall"]
    with pytest.raises(ValueError, match="other settings"):
        run_continual(str(tmp_path), seeds=1, show=False, task=tiny_task(top_t=8))


def test_the_sparse_arm_changes_only_value_rows(tmp_path):
    task = tiny_task()
    world = continual.World(task)
    model = continual.pretrain(task, world, 0, str(tmp_path / "pre"), show=False)
    background = continual.Background.load(tmp_path / "pre" / "background.pt")
    trained, optimizer, smf, _ = continual.prepare_arm("sparse_memory", model, task, background, 1e-2)
    start = {n: p.detach().clone() for n, p in trained.named_parameters()}
    x, y = continual.PackedStream(world.new_docs, task.seq_len).batch(0, 4)
    trained(x, y).loss.backward()
    rows = smf.select_rows()
    optimizer.step()
    for name, p in trained.named_parameters():
        if name.endswith("memory.store.weight"):
            moved = (p != start[name]).any(-1).nonzero().flatten()
            assert torch.equal(moved, next(iter(rows.values()))) and 0 < len(moved) <= task.top_t
        else:
            assert torch.equal(p, start[name]), name


def test_choose_lr_keeps_the_most_old_facts_among_runs_that_learned():
    runs = [
        {"lr": 1, "reached": 1.0, "old_recall": 0.5, "steps": 10, "new_recall": 0.7},
        {"lr": 2, "reached": 1.0, "old_recall": 0.8, "steps": 30, "new_recall": 0.6},
        {"lr": 3, "reached": 0.0, "old_recall": 0.9, "steps": 40, "new_recall": 0.3},
    ]
    assert choose_lr(runs)["lr"] == 2
    assert choose_lr([{**r, "reached": 0.0} for r in runs])["lr"] == 1  # none learned: the most new facts
    flat = [{**r, "reached": 0.0, "new_recall": 0.0} for r in runs]
    assert choose_lr(flat)["lr"] == 3  # nothing learned at all: the largest rate (a sweep then looks higher)


def test_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown arm"):
        run_continual(str(tmp_path), arms=["dense"], show=False, task=tiny_task())
    with pytest.raises(ValueError, match="unknown preset"):
        run_continual(str(tmp_path), preset="gpu", show=False)
    with pytest.raises(ValueError, match="seeds must be"):
        run_continual(str(tmp_path), seeds=0, show=False, task=tiny_task())
    assert main(["experiment", "continual", "--steps", "5", "--out", str(tmp_path)]) == 2
    assert "--steps and --tasks are options of utilisation" in capsys.readouterr().err
