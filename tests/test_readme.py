"""Every ```python block of the README runs (examples that do not run are worse than none)."""

import re
from pathlib import Path

import pytest

from memlayers.memory import registry

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.fixture(autouse=True)
def _restore_registries():
    """A block may register a kind or preset (the "write your own memory" example): undo it after the test, so
    later tests (and a rerun of the block) see only the library's own."""
    saved = [(table, dict(table)) for table in (registry.KINDS, registry.PRESETS)]
    yield
    for table, entries in saved:  # in place: other modules hold these dicts
        table.clear()
        table.update(entries)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
    exec(compile(code, "README.md", "exec"), {})


def test_the_trained_model_example_generates(tmp_path):
    """The "A trained model in Python" block defines ``continue_text``: run it on a tiny trained run."""
    from memlayers.train import load_config, train

    (code,) = [b for b in BLOCKS if "def continue_text" in b]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    overrides = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "data.facts.people=8",
                 "data.facts.choices=4", "data.facts.formats=records", "train.steps=2", "train.batch_size=2",
                 "train.seq_len=16", "train.eval_every=0", "train.progress=false"]  # fmt: skip
    train(load_config(None, overrides), tmp_path, evaluate=False)
    text = namespace["continue_text"](str(tmp_path), "", n=5)
    assert isinstance(text, str) and len(text.split()) <= 5
