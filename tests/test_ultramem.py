"""The "ultramem" kind end to end: config, layer, optimizer groups, accounting, checkpoints, the model."""

import math

import pytest
import torch

import memlayers
import memlayers.memory.kinds.ultramem  # registers the kind and preset
from memlayers.memory import MemoryLayer, preset
from memlayers.memory.addressing.tucker import TuckerProductKeys
from memlayers.memory.kinds.ultramem import UltraMemConfig
from memlayers.memory.stores.ive import ImplicitValueExpansion
from memlayers.model import MemorySpec, ModelConfig, Transformer
from memlayers.optim import lr_decay_scale

SMALL = dict(n_keys=8, topk=4, heads=2)


def small_layer(**kw) -> MemoryLayer:
    return MemoryLayer.from_preset("ultramem", 16, **(SMALL | kw))


def test_preset_defaults():
    c = preset("ultramem", 512)
    assert isinstance(c, UltraMemConfig) and c.kind == "ultramem"
    assert (c.n_keys, c.heads, c.topk, c.key_dim, c.rank, c.cores, c.expansion) == (1024, 2, 32, 256, 2, 2, 4)
    assert c.value_dim == 256 and c.score_fn == "identity" and c.query_norm == "layernorm"
    assert c.num_slots == 1024**2 and c.num_values == 1024**2 // 4
    assert c.lr_decay == (10.0, 1.0) and c.aux_weight == 0.001 and c.aux_tau == 0.15
    assert preset("ultramem", 18, **SMALL).value_dim == 8  # dim/2 = 9, rounded down to a multiple of cores
    assert preset("ultramem", 18, **SMALL, value_lr_start=1.0).lr_decay is None


def test_parts_and_init():
    layer = small_layer(n_layers=None)
    a, s = layer.addressing, layer.store
    assert isinstance(a, TuckerProductKeys) and isinstance(s, ImplicitValueExpansion)
    assert not a.query_per_rank and a.prefilter == 4 and a.num_slots == 64 and a.grid == 8
    assert (s.num_values, s.expansion, s.num_slots, s.value_dim, s.out_dim, s.cores) == (16, 4, 64, 8, 8, 2)
    assert s.lr_decay == (10.0, 1.0) and layer.readout.out_proj.in_features == 8
    c = layer.config
    assert c.value_init_std == math.sqrt(4 / (2 * 4 * 2 * 1))
    deep = c.in_model(12, 100)
    assert deep.n_layers == 12 and deep.value_init_std == math.sqrt(4 / (2 * 4 * 2 * 12))
    assert deep.in_model(3, 100).n_layers == 12  # an explicit depth is kept
    torch.manual_seed(0)
    big = MemoryLayer(preset("ultramem", 32, n_keys=64, topk=4, heads=2, n_layers=2))
    assert abs(big.store.weight.std().item() - big.config.value_init_std) < 0.02 * big.config.value_init_std
    assert preset("ultramem", 16, **SMALL, prefilter=6).make_addressing().prefilter == 6


def test_forward_backward_and_aux():
    torch.manual_seed(0)
    layer = small_layer()
    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    aux = layer.aux_loss()
    assert aux is not None and aux.dim() == 0
    (y.square().mean() + aux).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert small_layer(aux_weight=0.0).aux_loss() is None
    ids, w = layer.retrieve(x)
    assert ids.shape == (2, 5, 2, 4) and w.shape == (2, 5, 2, 4, 2)


def test_param_groups_and_lr_decay():
    layer = small_layer()
    groups = {g["name"]: g for g in memlayers.param_groups(layer, 1e-3)}
    values = groups["values"]
    assert values["lr_decay"] == (10.0, 1.0) and values["weight_decay"] == 0.0
    assert [id(p) for p in values["params"]] == [id(layer.store.weight)]
    assert values["lr"] == pytest.approx(1e-3 * 10 / 10)  # value_lr / start: 10 x lr at the start, 1 x at the end
    assert [id(p) for p in groups["subkeys"]["params"]] == [id(layer.addressing.keys), id(layer.addressing.cores)]
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert id(layer.store.proj) in decayed and id(layer.addressing.cores) not in decayed
    plain = {g["name"]: g for g in memlayers.param_groups(small_layer(value_lr_start=1.0), 1e-3)}
    assert "lr_decay" not in plain["values"]
    assert lr_decay_scale((10.0, 1.0), 0, 100) == 10.0
    assert lr_decay_scale((10.0, 1.0), 50, 100) == 5.5
    assert lr_decay_scale((10.0, 0.5), 50, 100) == 1.0
    assert lr_decay_scale((10.0, 0.5), 90, 100) == 1.0
    sparse = {
        g["name"]: g for g in memlayers.param_groups(small_layer(sparse_values=True, value_lr_decay_frac=0.25), 1e-3)
    }
    assert sparse["values"]["lr_decay"] == (10.0, 0.25)


def test_accounting():
    layer = small_layer(prefilter=6)
    a, s, r = layer.parts()
    reads = 2 * 4
    assert layer.flops_per_token() == a.flops_per_token() + s.read_flops(reads) + r.flops_per_token()
    assert s.read_flops(reads) == 2 * reads * 8 + 2 * 4 * 8 * 8
    assert r.flops_per_token() == 2 * 8 * 16
    assert layer.reads_per_token() == reads * 8


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    a = small_layer(seed=1)
    b = small_layer(seed=2)
    keys = set(a.state_dict())
    assert {"addressing.u", "addressing.v", "addressing.svd_step", "store.perm"} <= keys
    opt = torch.optim.SGD(a.parameters(), lr=0.01)
    x = torch.randn(6, 16)
    for _ in range(3):
        opt.zero_grad()
        (a(x).square().mean() + a.aux_loss()).backward()
        opt.step()
    assert a.addressing.svd_step.item() == 3
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.store.perm, a.store.perm)
    for layer in (a, b):
        layer.train()
    assert torch.equal(a(x), b(x))  # both refresh the filter from the same state
    for name in ("u", "v", "svd_step"):
        assert torch.equal(getattr(a.addressing, name), getattr(b.addressing, name))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_keys=7), "expansion"),
        (dict(expansion=0), "expansion"),
        (dict(rank=0), "rank"),
        (dict(cores=0), "cores"),
        (dict(value_dim=9), "value_dim"),
        (dict(prefilter=3), "prefilter"),
        (dict(prefilter=9), "prefilter"),
        (dict(svd_every=0), "svd_every"),
        (dict(aux_weight=-0.1), "aux_weight"),
        (dict(aux_tau=-0.1), "aux_tau"),
        (dict(value_lr_start=0.0), "value_lr_start"),
        (dict(value_lr_decay_frac=0.0), "value_lr_decay_frac"),
        (dict(value_lr_decay_frac=1.5), "value_lr_decay_frac"),
        (dict(n_layers=0), "n_layers"),
        (dict(seed=-1), "seed"),
        (dict(query_norm="batchnorm"), "query_norm"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(score_fn="tanh"), "score_fn"),
        (dict(rank=1.5), "rank"),
    ],
)
def test_bad_configs(overrides, field):
    with pytest.raises(ValueError, match=rf"UltraMemConfig\.{field}: ") as err:
        preset("ultramem", 16, **(SMALL | overrides))
    assert "\n" not in str(err.value)


def test_transformer_skip_layer():
    torch.manual_seed(0)
    spec = MemorySpec(layers="2,3", preset="ultramem", mode="beside", skip=1, options=dict(SMALL))
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=4, n_heads=2, max_seq_len=16, memories=[spec]))
    assert model.memory_reads == {2: 1, 3: 2}
    layers = model.memory_layers()
    assert [i for i, _ in layers] == [2, 3] and all(m.config.n_layers == 4 for _, m in layers)
    idx = torch.randint(0, 40, (2, 10))
    out = model(idx, idx)
    assert out.logits.shape == (2, 10, 40)
    want_aux = sum(m.aux_loss() for _, m in layers)
    assert torch.allclose(out.aux_loss, want_aux)
    (out.loss + out.aux_loss).backward()
    for i, m in layers:
        assert m.store.weight.grad is not None and m.addressing.cores.grad is not None, i
    opt = memlayers.build_optimizer(model, 1e-3)
    assert any(g.get("lr_decay") == (10.0, 1.0) for g in opt.param_groups)


def test_transformer_shared_pool():
    torch.manual_seed(0)
    spec = MemorySpec(layers="1,3", preset="ultramem", pool="mem", options=dict(SMALL))
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=4, n_heads=2, max_seq_len=16, memories=[spec]))
    pool = model.pools["mem"]
    assert isinstance(pool, ImplicitValueExpansion)
    assert all(m.store is pool for _, m in model.memory_layers())
    idx = torch.randint(0, 40, (2, 6))
    model(idx, idx).loss.backward()
    assert pool.weight.grad is not None and pool.proj.grad is not None
    rows = preset("ultramem", 32, **SMALL).make_pool(70)  # not a multiple of E: rounded up
    assert rows.num_values == 18 and rows.num_slots == 72


def test_the_trainer_decays_the_value_lr(tmp_path):
    """value lr = lr x (start falling linearly to 1 at value_lr_decay_frac of training), on top of the schedule."""
    import json

    from memlayers.train import load_config, train

    memory = "model.memories=[{layers: '1', preset: ultramem, options: {n_keys: 8, topk: 4, heads: 2, " \
             "value_lr_start: 10.0, value_lr_decay_frac: 0.5}}]"  # fmt: skip
    overrides = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16",
                 "data.facts.people=10", "data.facts.choices=5", "train.steps=10", "train.batch_size=2",
                 "train.seq_len=16", "train.warmup=2", "train.log_every=1", "train.eval_every=0",
                 "train.progress=false", "train.threads=1", memory]  # fmt: skip
    train(load_config(None, overrides), tmp_path, evaluate=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "value_lr" in r]
    assert [r["step"] for r in logged] == list(range(1, 11))
    for r in logged:
        assert r["value_lr"] == pytest.approx(r["lr"] * lr_decay_scale((10.0, 0.5), r["step"], 10)), r["step"]
    assert logged[0]["value_lr"] / logged[0]["lr"] == pytest.approx(8.2) and logged[-1]["value_lr"] == logged[-1]["lr"]
    assert "aux_loss" in logged[0]  # the Tucker core penalty is logged
