"""``memlayers export``: a run's model as one safetensors file that loads in one process (weights, tied weights,
usage statistics, config), and the clear errors around it."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import tiny

from memlayers import cli
from memlayers.train import CheckpointError, load_checkpoint, train
from memlayers.train.export import export_safetensors, read_safetensors

MEMORY = "model.memories=[{layers: '1', preset: memory_plus, options: {n_keys: 16, topk: 4, heads: 2}}]"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train(tiny("train.steps=3", "model.max_seq_len=64", MEMORY), out, evaluate=False)  # long enough for eval
    return out


def test_round_trip_gives_the_same_model(run, tmp_path):
    path = export_safetensors(run, tmp_path / "m.safetensors")
    cfg, model, extra = load_checkpoint(run)
    cfg2, model2, extra2 = load_checkpoint(path)  # load_checkpoint reads .safetensors too
    assert cfg2.to_dict() == cfg.to_dict() and extra2 == {"step": extra["step"], "tokens": extra["tokens"]}
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert model2.lm_head.weight is model2.tok_emb.weight  # tied: stored once, tied again on load
    (_, layer), (_, layer2) = next(iter(model.memory_layers())), next(iter(model2.memory_layers()))
    assert layer.usage.summary() == layer2.usage.summary() and layer.usage.summary()["tokens_seen"] > 0
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    assert torch.equal(model(x).logits, model2(x).logits)
    tensors = load_file(path)  # plain safetensors, no memlayers needed
    assert "tok_emb.weight" in tensors and "lm_head.weight" not in tensors
    assert any(k.startswith("usage/") for k in tensors)


def test_cli_exports_evaluates_and_refuses_to_overwrite(run, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert cli.main(["export", str(run), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    before = out.read_bytes()
    assert cli.main(["export", str(run), str(out)]) == 2
    assert "exists; choose another name, or pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert cli.main(["export", str(run), str(out), "--force"]) == 0
    assert cli.main(["eval", str(out), "--limit", "2"]) == 0
    assert "step 3" in capsys.readouterr().out
    assert cli.main(["export", str(run), str(tmp_path / "m.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_a_new_run_starts_from_an_exported_model(run, tmp_path):
    path = export_safetensors(run, tmp_path / "m.safetensors")
    out = tmp_path / "b"
    init = tiny("train.steps=1", "train.lr=1e-12", "train.warmup=0", "model.max_seq_len=64", MEMORY,
                f"train.init_from={path}")  # fmt: skip
    train(init, out, evaluate=False)
    _, model, _ = load_checkpoint(run)
    _, model_b, _ = load_checkpoint(out)
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_damaged_or_foreign_files_are_refused(run, tmp_path):
    path = export_safetensors(run, tmp_path / "m.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cannot read it .* truncated or not safetensors"):
        read_safetensors(cut)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a memlayers model"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_checkpoint(tmp_path / "none.safetensors")
