"""The PEER kind: PEERExperts store, PEERConfig and its preset, in a layer and in the LM."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import memlayers
import memlayers.memory.kinds.peer  # registers the "peer" kind and preset
from memlayers.accounting import account
from memlayers.memory import MemoryLayer, preset
from memlayers.memory.kinds.peer import PEERConfig
from memlayers.memory.stores.peer_experts import PEERExperts
from memlayers.model import MemorySpec, ModelConfig, Transformer

ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "identity": lambda h: h}


def naive_experts(u, v, ids, weights, x, activation="gelu"):
    """sum_{h,k} w * act(u[ids] . x) * v[ids], materialising every selected expert's rows."""
    h = torch.einsum("thkd,td->thk", u[ids], x)
    return torch.einsum("thk,thkd->td", weights * ACTS[activation](h), v[ids])


def naive_layer(layer, x):
    """The layer's output from its own retrieved ids and weights, recomputed in float64."""
    ids, weights = layer.retrieve(x)
    s = layer.store
    y = naive_experts(s.u.double(), s.v.double(), ids, weights.double(), x.double(), s.activation)
    out = layer.readout.out_proj
    return y if out is None else F.linear(y, out.weight.double(), out.bias.double())


def tiny(**overrides):
    return MemoryLayer.from_preset("peer", 16, **{"n_keys": 4, "heads": 2, "topk": 3, **overrides})


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "identity"])
@pytest.mark.parametrize("value_dim", [None, 12])
def test_layer_matches_naive(activation, value_dim):
    layer = tiny(activation=activation, value_dim=value_dim).eval()
    x = torch.randn(5, 16)
    assert rel_err(layer(x), naive_layer(layer, x)) < 1e-5


def test_sigmoid_gates_match_naive():
    layer = tiny(score_fn="sigmoid").eval()
    x = torch.randn(7, 16)
    _, weights = layer.retrieve(x)
    assert ((weights > 0) & (weights < 1)).all()
    assert (weights.sum(-1) - 1).abs().max() > 0.1  # not a softmax: the gates of a head need not sum to 1
    assert rel_err(layer(x), naive_layer(layer, x)) < 1e-5


def test_store_gradients_match_naive():
    """Gradients in u, v, x and the gates, against the materialising formula in float64."""
    store = PEERExperts(30, 8, 6, "gelu")
    ids = torch.randint(0, 30, (5, 2, 3))
    ids[1, 0, :] = 4  # one expert chosen three times by one token...
    ids[3, 1, 0] = 4  # ...and once by another
    weights = torch.rand(5, 2, 3, requires_grad=True)
    x = torch.randn(5, 8, requires_grad=True)
    grad_out = torch.randn(5, 6)
    out = store(ids, weights, x)
    ours = torch.autograd.grad(out, (store.u, store.v, x, weights), grad_out)
    params = [t.detach().double().requires_grad_() for t in (store.u, store.v, x, weights)]
    ref_out = naive_experts(params[0], params[1], ids, params[3], params[2])
    ref = torch.autograd.grad(ref_out, params, grad_out.double())
    assert out.shape == (5, 6) and rel_err(out, ref_out) < 1e-5
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5


def test_gradients_reach_u_v_keys_and_query():
    layer = tiny().train()
    x = torch.randn(2, 5, 16)
    layer(x).square().sum().backward()
    ids, _ = layer.retrieve(x)
    s, a = layer.store, layer.addressing
    touched = torch.zeros(s.num_slots, dtype=torch.bool)
    touched[ids.flatten()] = True
    for table in (s.u, s.v):
        assert table.grad.abs().sum(-1)[touched].gt(0).all()
        assert not table.grad[~touched].any()  # untouched experts get exactly nothing
    assert a.keys.grad.abs().sum() > 0 and a.query.weight.grad.abs().sum() > 0


def test_sparse_values_train_with_sparse_adam():
    torch.manual_seed(1)
    layer = tiny(sparse_values=True)
    opt = memlayers.build_optimizer(layer, 1e-3, value_optimizer="sparse_adam")
    x = torch.randn(3, 16)
    ids, _ = layer.retrieve(x)
    before = {n: p.detach().clone() for n, p in layer.store.named_parameters()}
    layer(x).square().sum().backward()
    assert layer.store.u.grad.is_sparse and layer.store.v.grad.is_sparse
    opt.step()
    touched = torch.zeros(layer.store.num_slots, dtype=torch.bool)
    touched[ids.flatten()] = True
    assert 0 < touched.sum() < layer.store.num_slots
    for name, p in layer.store.named_parameters():
        assert torch.equal(p[~touched], before[name][~touched])  # bit-identical
        assert (p[touched] != before[name][touched]).any(-1).all()


def test_dense_adamw_rejects_sparse_values():
    with pytest.raises(ValueError, match="sparse"):
        memlayers.build_optimizer(tiny(sparse_values=True), 1e-3)


def test_u_and_v_are_values():
    layer = tiny()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in memlayers.param_groups(layer, 1e-3)}
    u, v = layer.store.u, layer.store.v
    assert {id(u), id(v)} == groups["values"]
    assert id(layer.addressing.keys) in groups["subkeys"]
    assert not {id(u), id(v)} & (groups["decay"] | groups["no_decay"])


@pytest.mark.parametrize("value_dim", [None, 12])
def test_flops_and_reads(value_dim):
    layer = tiny(value_dim=value_dim)
    dv = value_dim or 16
    reads = 2 * 3
    s = layer.store
    assert s.read_params(reads) == reads * (16 + dv)
    assert s.read_flops(reads) == 2 * reads * 16 + 2 * reads * dv
    assert layer.reads_per_token() == reads * (16 + dv)
    projection = 0 if value_dim is None else 2 * dv * 16
    assert layer.flops_per_token() == layer.addressing.flops_per_token() + s.read_flops(reads) + projection


def test_init_scales():
    torch.manual_seed(0)
    s = PEERExperts(4096, 64, 32)
    assert abs(s.u.std().item() - 64**-0.5) < 0.01 and abs(s.v.std().item() - 32**-0.5) < 0.01
    assert abs(PEERExperts(4096, 64, 32, init_std=0.02).v.std().item() - 0.02) < 0.002


def test_preset_defaults():
    c = preset("peer", 512)
    assert isinstance(c, PEERConfig) and c.kind == "peer"
    assert (c.n_keys, c.heads, c.topk, c.key_dim, c.value_dim) == (1024, 8, 16, 256, 512)
    assert (c.query_norm, c.score_fn, c.activation) == ("batchnorm", "softmax", "gelu")
    assert preset("peer", 30).key_dim == 14


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"activation": "tanh"}, r"PEERConfig\.activation: unknown 'tanh'; choose one of"),
        ({"score_fn": "sigmod"}, r"PEERConfig\.score_fn"),
        ({"activation": 1}, r"PEERConfig\.activation: must be a string"),
        ({"topk": 5}, r"PEERConfig\.topk"),
    ],
)
def test_bad_config_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        preset("peer", 16, **{"n_keys": 4, "heads": 2, "topk": 3, **overrides})
    assert "\n" not in str(err.value)


def test_store_rejects_multi_core_weights():
    store = PEERExperts(10, 4, 4)
    ids = torch.randint(0, 10, (2, 1, 3))
    with pytest.raises(ValueError, match="one gate per expert"):
        store(ids, torch.rand(2, 1, 3, 2), torch.randn(2, 4))


class TwoLayers(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pool = config.make_pool()
        self.a, self.b = MemoryLayer(config, self.pool), MemoryLayer(config, self.pool)

    def forward(self, x):
        return self.b(x + self.a(x))


def test_shared_pool_is_one_table_and_round_trips():
    config = preset("peer", 16, n_keys=4, heads=2, topk=3)
    model = TwoLayers(config).eval()
    state = model.state_dict()
    assert [k for k in state if k.endswith((".u", ".v"))] == ["pool.u", "pool.v"]
    x = torch.randn(6, 16)
    model(x).sum().backward()
    ids = torch.cat([model.a.retrieve(x)[0].flatten(), model.b.retrieve(x + model.a(x))[0].flatten()])
    assert model.pool.u.grad.abs().sum(-1)[ids.unique()].gt(0).all()  # both layers' reads land in one table
    torch.manual_seed(123)
    other = TwoLayers(config).eval()
    assert not torch.equal(other.pool.u, model.pool.u)
    other.load_state_dict(state)
    assert torch.equal(other(x), model(x))
    assert other.a.store is other.pool and other.b.store is other.pool


def test_pool_with_another_activation_is_refused():
    pool = preset("peer", 16, n_keys=4, heads=2, topk=3, activation="relu").make_pool()
    with pytest.raises(ValueError, match="activation: the layer needs 'gelu', the pool has 'relu'"):
        MemoryLayer(preset("peer", 16, n_keys=4, heads=2, topk=3), pool)


@pytest.mark.parametrize("pool", [None, "experts"])
def test_transformer_with_peer_runs_forward_and_backward(pool):
    layers = "1" if pool is None else "0,1"
    spec = MemorySpec(layers=layers, preset="peer", pool=pool, options={"n_keys": 4, "heads": 2, "topk": 2})
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=8, memories=[spec])
    model = Transformer(cfg)
    idx = torch.randint(0, 32, (2, 8))
    out = model(idx, idx)
    out.loss.backward()
    assert out.logits.shape == (2, 8, 32) and torch.isfinite(out.loss)
    store = model.blocks[1].memory.store
    assert isinstance(store, PEERExperts) and store.u.grad.abs().sum() > 0 and store.v.grad.abs().sum() > 0
    acc = account(model, 8)
    assert acc.memory_params == 16 * (16 + 16)  # u and v of 4^2 experts; a shared pool counts once
    assert acc.breakdown["memory"] == sum(b.memory.flops_per_token() for b in model.blocks if b.memory is not None)
