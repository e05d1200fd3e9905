"""The LM subcommands of the command line: train, eval, compare (tiny sizes), and their errors."""

import json

from memlayers import cli

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "data.facts.people=8",
        "data.facts.choices=4", "data.facts.formats=records", "train.steps=4", "train.batch_size=4",
        "train.seq_len=16", "train.warmup=1", "train.eval_every=0", "train.threads=1"]  # fmt: skip


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--quiet", *TINY]) == 0
    assert (out / "result.json").exists() and (out / "checkpoint.pt").exists()
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "step 4" in printed and "recall/records/birth_city" in printed
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= metrics["recall/records"] <= 1.0 and metrics["loss"] > 0


def test_print_config_applies_overrides(capsys):
    assert cli.main(["train", "--print-config", "model.dim=48"]) == 0
    assert "dim: 48" in capsys.readouterr().out


def test_bad_memory_option_type_is_one_line_naming_the_key(capsys):
    assert cli.main(["train", "--print-config", "model.memories=[{layers: '1', options: {n_keys: 16.5}}]"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "memlayers train: error: model.memories[0].options: MemoryConfig.n_keys: must be an integer, got 16.5 (float); "
        "use e.g. 1024\n"
    )


def test_compare_list(capsys):
    assert cli.main(["compare", "--list"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("cpu") and "gpu" in printed


def test_errors_are_one_clear_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "x"), "model.dimm=3"]) == 2
    assert "unknown config key 'model.dimm'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["compare", "--preset", "huge"]) == 2
    assert "unknown compare preset 'huge'" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["eval", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_json_into_a_missing_folder_fails_before_evaluating(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "no_run"), "--json", str(tmp_path / "nowhere" / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--json" in err and "does not exist; create it" in err and "\n" not in err


def test_bad_yaml_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train: {steps: 3\n  lr: [\n")
    assert cli.main(["train", "--print-config", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and "\n" not in err
