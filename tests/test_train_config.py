"""RunConfig loading: YAML + dotlist overrides, round trips, and the errors for bad keys and values."""

import pytest

from memlayers.model import MemorySpec
from memlayers.train import RunConfig, TrainConfig, config_diff, load_config, save_config
from memlayers.train.config import flatten

YAML = """
model:
  dim: 64
  n_layers: 3
  memories:
    - layers: "1"
      pool: shared
      options: {n_keys: 32, topk: 4}
data:
  facts: {people: 50}
train:
  lr: 3.0e-4
  clip: null
"""


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    with pytest.raises(ValueError, match=r"set model.memories\[0\].options.sparse_values=true"):
        load_config(path, ["train.value_optimizer=sparse_adam"])
    sparse_memory = (
        "model.memories=[{layers: '1,2', pool: shared, options: {n_keys: 32, topk: 4, sparse_values: true}}]"
    )
    cfg = load_config(path, ["train.steps=7", "model.dim=96", "train.value_optimizer=sparse_adam", sparse_memory])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.train, TrainConfig)
    assert cfg.model.dim == 96 and cfg.model.n_layers == 3  # override beats the file, the file beats defaults
    assert cfg.train.lr == 3e-4 and cfg.train.clip is None and cfg.train.steps == 7
    assert cfg.train.value_optimizer == "sparse_adam" and cfg.train.batch_size == TrainConfig().batch_size
    assert cfg.data.facts.people == 50
    (spec,) = cfg.model.memories
    assert (
        isinstance(spec, MemorySpec)
        and spec.pool == "shared"
        and spec.options == {"n_keys": 32, "topk": 4, "sparse_values": True}
    )

    # a list override replaces the whole list
    cfg2 = load_config(path, ["model.memories=[{layers: '0,2', options: {n_keys: 8, topk: 2}}, {layers: '1'}]"])
    assert [m.layers for m in cfg2.model.memories] == ["0,2", "1"]
    assert cfg2.model.memories[0].options == {"n_keys": 8, "topk": 2}

    # round trips: dict and saved YAML
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config() == RunConfig()


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1e-3", ["'train.lrr'", "did you mean", "lr", "valid keys of TrainConfig"]),
        ("modle.dim=3", ["'modle'", "valid keys of RunConfig", "model, data, train"]),
        ("model.memories=[{layerz: '1'}]", ["'layerz'", "MemorySpec", "layers"]),
        ("train.steps=abc", ["'train.steps'", "abc", "Integer"]),
        ("train.lr=fast", ["'train.lr'", "Float"]),
        ("train.steps=0", ["train.steps", ">= 1"]),
        ("train.value_optimizer=sgd", ["train.value_optimizer", "sparse_adam"]),
        # errors from the nested configs' own checks name the key as written in YAML and overrides
        ("model.dim=0", ["model.dim:", ">= 1"]),
        ("model.moe={experts: 0}", ["model.moe.experts:"]),
        ("model.memories=[{layers: '1'}, {layers: '9'}]", ["model.memories[1].layers:", "out of range"]),
        ("model.memories=[{layers: '1', options: {n_keyz: 3}}]", ["model.memories[0].options:", "n_keyz"]),
        ("data.facts.people=0", ["data.facts.people:", ">= 1"]),
        ("data.kind=foo", ["data.kind:", "facts, text"]),
        ("train.dtype=fp16", ["train.dtype", "bfloat16"]),
        ("train.steps", ["key=value"]),
        ("=3", ["no key"]),
    ],
)
def test_override_errors_name_the_key(override, words):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    msg = str(e.value).lower()
    for w in words:
        assert w.lower() in msg, (w, msg)


def test_overrides_index_into_lists(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    # the fix the sparse-optimizer error suggests must itself work
    cfg = load_config(path, ["model.memories[0].options.sparse_values=true", "train.value_optimizer=sparse_adagrad"])
    assert cfg.model.memories[0].options == {"n_keys": 32, "topk": 4, "sparse_values": True}
    assert cfg.model.memories[0].layers == "1" and cfg.model.memories[0].pool == "shared"
    cfg = load_config(path, ["model.memories[0].layers=2"])
    assert cfg.model.memories[0].layers == "2"
    cfg = load_config(path, ["train.steps=300", "train.warmup=${train.steps}"])  # interpolation, resolved at the end
    assert cfg.train.warmup == 300
    with pytest.raises(
        ValueError, match=r"model.memories has 1 item\(s\), so index 3 does not exist.*model.memories=\[\.\.\.\]"
    ):
        load_config(path, ["model.memories[3].pool=x"])
    with pytest.raises(
        ValueError, match=r"key 'model.memories\[0\].layerz'.*did you mean 'model.memories\[0\].layers'"
    ):
        load_config(path, ["model.memories[0].layerz=1"])


def test_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  seed: 1\n  batchsize: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'train.batchsize' in .*bad.yaml.*batch_size"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)
    bad.write_text("model:\n  dim: 30\n  n_heads: 4\n")  # the model's own validation (dim/heads not even)
    with pytest.raises(ValueError, match="n_heads"):
        load_config(bad)


def test_config_diff():
    a = RunConfig().to_dict()
    b = load_config(None, ["train.lr=0.5", "model.dim=64", "train.progress=false"]).to_dict()
    assert config_diff(a, b, ignore=("train.progress",)) == [("model.dim", 128, 64), ("train.lr", 1e-3, 0.5)]
    c = load_config(None, ["model.memories=[{layers: '1', options: {n_keys: 8, topk: 2}}]"]).to_dict()
    keys = [k for k, _, _ in config_diff(a, c)]
    assert keys == ["model.memories.0.layers", "model.memories.0.options.n_keys", "model.memories.0.options.topk"]
    # a spec saved before skip/share existed reads them as their defaults: no difference
    old = {
        **c,
        "model": {
            **c["model"],
            "memories": [{k: v for k, v in c["model"]["memories"][0].items() if k not in ("skip", "share")}],
        },
    }
    assert config_diff(old, c) == []
    assert [k for k, _, _ in config_diff(c, a)] == keys
    assert config_diff(a, a) == []
    assert config_diff({"x": 1}, {"x": 1.0}) == [] and config_diff({"x": True}, {"x": 1}) != []
    assert flatten({"a": {"b": [1, {"c": 2}], "d": {}}}) == {"a.b.0": 1, "a.b.1.c": 2, "a.d": {}}


def test_sparse_values_with_adamw_names_the_config_keys():
    memory = "model.memories=[{layers: '1', preset: memory_plus, options: {n_keys: 8, topk: 4, sparse_values: true}}]"
    match = r"train.value_optimizer=adamw cannot take .*model.memories\[0\].options.sparse_values=true"
    with pytest.raises(ValueError, match=match):
        load_config(None, [memory])
