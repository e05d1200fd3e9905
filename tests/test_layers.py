import copy
import io

import pytest
import torch
from conftest import DEVICES, rel_err

import memlayers
from memlayers import MemoryConfig, MemoryLayer, ValueTable, preset
from memlayers.memory.norms import MaskedBatchNorm
from memlayers.ops import embedding_bag_naive


def small(name="memory", dim=24, **overrides):
    return MemoryLayer.from_preset(name, dim, **{"n_keys": 16, "heads": 2, "topk": 4, **overrides})


PRODUCT_KEY_PRESETS = sorted(n for n, p in memlayers.PRESETS.items() if p.config is MemoryConfig)


@pytest.mark.parametrize("name", PRODUCT_KEY_PRESETS)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 0)])
def test_any_leading_shape(name, lead):
    layer = small(name)
    x = torch.randn(*lead, 24, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_values", [False, True])
def test_bf16_values_train_on_device(device, sparse_values):
    layer = small("memory_plus", sparse_values=sparse_values).to(device)
    layer.store.to(torch.bfloat16)
    opt = memlayers.build_optimizer(layer, 1e-3, value_optimizer="sparse_adam" if sparse_values else "adamw")
    x = torch.randn(2, 9, 24, device=device)
    before = layer.store.weight.detach().clone()
    layer(x).square().mean().backward()
    opt.step()
    assert layer.store.weight.dtype == torch.bfloat16 and not torch.equal(layer.store.weight, before)
    assert layer.usage.summary()["tokens_seen"] == 18


def test_forward_is_the_weighted_sum_of_retrieved_values():
    layer = small("memory", dim=24, value_dim=10)  # value_dim != dim: output projection
    x = torch.randn(7, 24)
    indices, weights = layer.retrieve(x)
    assert indices.shape == weights.shape == (7, 2, 4)
    y = embedding_bag_naive(layer.store.weight, indices.flatten(1), weights.flatten(1))
    assert rel_err(layer(x), layer.readout.out_proj(y)) < 1e-5


def test_memory_plus_gated_output():
    layer = small("memory_plus")
    x = torch.randn(7, 24)
    indices, weights = layer.retrieve(x)
    y = embedding_bag_naive(layer.store.weight, indices.flatten(1), weights.flatten(1))
    expected = layer.readout.out_proj(y * torch.nn.functional.silu(layer.readout.gate_proj(x)))
    assert rel_err(layer(x), expected) < 1e-5


@pytest.mark.parametrize("score_fn", ["softmax", "relu", "identity"])
def test_score_functions(score_fn):
    layer = small(score_fn=score_fn)
    _, weights = layer.retrieve(torch.randn(9, 24))
    assert (weights[..., :-1] >= weights[..., 1:]).all()  # best first
    if score_fn == "softmax":
        assert torch.allclose(weights.sum(-1), torch.ones(9, 2))
    with torch.no_grad():  # make every score negative: q = -1, keys > 0
        layer.addressing.query.weight.zero_()
        layer.addressing.query.bias.fill_(-1.0)
        layer.addressing.keys.abs_()
    _, weights = layer.retrieve(torch.randn(9, 24))
    expected = {"softmax": weights > 0, "relu": weights == 0, "identity": weights < 0}[score_fn]
    assert expected.all()


@pytest.mark.parametrize("query_norm", ["none", "layernorm", "rmsnorm", "batchnorm"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_query_norms_train_and_eval(query_norm, qk_norm):
    layer = small(query_norm=query_norm, qk_norm=qk_norm)
    x = torch.randn(3, 5, 24)
    layer(x).square().mean().backward()
    assert layer.addressing.keys.grad.abs().sum() > 0
    layer.eval()
    single = layer(x[:1, :1])
    assert torch.allclose(single, layer(x)[:1, :1], atol=1e-6)  # eval: no dependence on the batch


def test_autocast_bf16():
    layer = small("memory_plus")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 24))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("query_norm", ["none", "layernorm", "rmsnorm", "batchnorm"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_trains_after_cast(device, dtype, query_norm, qk_norm):
    layer = small("memory_plus", query_norm=query_norm, qk_norm=qk_norm).to(device, dtype)
    x = torch.randn(3, 5, 24, device=device, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
    if query_norm == "batchnorm":
        bn = layer.addressing.query_norm
        assert bn.running_mean.dtype == bn.running_var.dtype == dtype
        assert bn.running_mean.abs().sum() > 0 and (bn.running_var != 1).any()  # updated from the batch
    _, weights = layer.retrieve(x)
    assert weights.dtype == torch.promote_types(dtype, torch.float32)  # scores in fp32, fp64 for fp64
    layer.eval()
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_batchnorm_low_precision_stats_are_fp32_stats_rounded():
    x = torch.randn(10, 6).bfloat16()
    bn16, bn32 = MaskedBatchNorm(6).bfloat16(), MaskedBatchNorm(6)
    out = bn16(x)
    assert out.dtype == torch.bfloat16 and rel_err(out, bn32(x.float())) < 1e-2
    assert torch.equal(bn16.running_mean, bn32.running_mean.bfloat16())
    assert torch.equal(bn16.running_var, bn32.running_var.bfloat16())


@pytest.mark.parametrize("query_norm, qk_norm", [("none", True), ("batchnorm", False)])
def test_float64_layer_passes_gradcheck(query_norm, qk_norm):
    torch.manual_seed(0)  # no near-ties among the scores: the top-k selection is piecewise constant
    cfg = MemoryConfig(dim=8, n_keys=4, heads=2, topk=3, query_norm=query_norm, qk_norm=qk_norm)
    layer = MemoryLayer(cfg).double().eval()  # eval: BatchNorm uses its running statistics
    names, params = zip(*layer.named_parameters())
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_keys_init_range():
    layer = small(key_dim=36)
    assert layer.addressing.keys.abs().max() <= 36**-0.5


def test_batchnorm_ignores_padding():
    torch.manual_seed(1)
    bn_a, bn_b = MaskedBatchNorm(6), MaskedBatchNorm(6)
    x = torch.randn(10, 6)
    mask = torch.tensor([True] * 7 + [False] * 3)
    padded = x.clone()
    padded[~mask] = 1e6  # garbage in padded rows must not touch the statistics
    out_a = bn_a(padded, mask)
    out_b = bn_b(x[mask])
    assert torch.allclose(out_a[mask], out_b, atol=1e-5)
    assert torch.allclose(bn_a.running_mean, bn_b.running_mean) and torch.allclose(bn_a.running_var, bn_b.running_var)
    bn, ref = MaskedBatchNorm(6), torch.nn.BatchNorm1d(6)  # and it is torch's BatchNorm when nothing is masked
    assert torch.allclose(bn(x), ref(x), atol=1e-5)
    assert torch.allclose(bn.running_mean, ref.running_mean) and torch.allclose(bn.running_var, ref.running_var)


def test_batchnorm_fully_padded_batch_keeps_running_stats():
    bn = MaskedBatchNorm(4)
    bn(torch.randn(5, 4), torch.zeros(5, dtype=torch.bool))
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))


def test_layer_mask_keeps_padding_out_of_usage_and_batchnorm():
    a, b = small("pkm"), small("pkm")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 24)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    a(x, mask)
    b(x[mask])
    assert torch.allclose(a.addressing.query_norm.running_mean, b.addressing.query_norm.running_mean)
    assert a.usage.summary()["tokens_seen"] == b.usage.summary()["tokens_seen"] == 9


def test_usage_tracked_in_training_only():
    layer = small()
    layer(torch.randn(4, 24))
    layer.eval()
    layer(torch.randn(4, 24))
    assert layer.usage.summary()["tokens_seen"] == 4
    assert small(track_usage=False).usage is None


# --- shared pools -----------------------------------------------------------------------------


class SharedPool(torch.nn.Module):
    """The owner of a pool and the layers reading it, as a model must be."""

    def __init__(self, n_layers=3, **kw):
        super().__init__()
        cfg = preset("memory_plus", 24, n_keys=16, heads=2, topk=4, **kw)
        self.pool = cfg.make_pool()
        self.layers = torch.nn.ModuleList(MemoryLayer(cfg, self.pool) for _ in range(n_layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_shared_pool_is_one_table_saved_once():
    model = SharedPool()
    pool, layers = model.pool, model.layers
    assert all(layer.store is pool for layer in layers)
    keys = [k for k in model.state_dict() if k.endswith("weight") and "pool" in k or "store" in k]
    assert keys == ["pool.weight"]
    assert sum(p is pool.weight for p in model.parameters()) == 1
    x = torch.randn(5, 24)
    # the gradient of the pool sums what the three layers read
    grads = []
    for layer in layers:
        pool.weight.grad = None
        layer(x).sum().backward()
        grads.append(pool.weight.grad.clone())
    pool.weight.grad = None
    sum(layer(x).sum() for layer in layers).backward()
    assert torch.allclose(pool.weight.grad, sum(grads), atol=1e-6)


def test_a_pool_the_model_does_not_hold_is_refused():
    cfg = preset("memory_plus", 24, n_keys=16, heads=2, topk=4)
    orphan = torch.nn.ModuleList(MemoryLayer(cfg, cfg.make_pool()) for _ in range(2))
    assert not any("weight" in k and "readout" not in k and "addressing" not in k for k in orphan.state_dict())
    with pytest.raises(ValueError, match="reads a shared pool that the model does not hold"):
        memlayers.param_groups(orphan, 1e-3)


def test_two_models_are_independent():
    a, b = SharedPool(), SharedPool()
    assert a.pool is not b.pool and a.layers[0].store is a.pool
    c, d = small(), small()
    assert c.store.weight.data_ptr() != d.store.weight.data_ptr()


def test_state_dict_round_trip_with_shared_pool():
    src, dst = SharedPool(), SharedPool()
    src.layers[0].usage.update(torch.zeros(1, 2, 4, dtype=torch.long), torch.ones(1, 2, 4))
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 24)
    assert torch.equal(src(x), dst(x))
    assert dst.layers[2].store is dst.pool  # still shared after loading
    assert not any("usage" in k for k in src.state_dict())  # metrics are not checkpoint state


def test_legacy_state_dict_keys_load():
    """Layers saved before the parts had modules (retrieval., values., gate_proj., out_proj.) still load."""
    layer = small("memory_plus")
    legacy = {}
    for k, v in layer.state_dict().items():
        for new, old in (("addressing.", "retrieval."), ("store.", "values."), ("readout.", "")):
            if k.startswith(new):
                k = old + k[len(new) :]
                break
        legacy[k] = v.clone()
    assert "retrieval.keys" in legacy and "values.weight" in legacy and "gate_proj.weight" in legacy
    fresh = small("memory_plus")
    fresh.load_state_dict(legacy)
    x = torch.randn(3, 24)
    assert torch.equal(fresh(x), layer(x))


def test_deepcopy_and_to_keep_sharing():
    model = copy.deepcopy(SharedPool()).to(torch.float64)
    assert model.layers[2].store is model.pool and model.pool.weight.dtype == torch.float64
    assert model(torch.randn(3, 24, dtype=torch.float64)).dtype == torch.float64


def test_shared_pool_size_mismatch():
    pool = preset("memory_plus", 24, n_keys=16, topk=4).make_pool()
    with pytest.raises(ValueError, match="num_slots: the layer needs 4096, the pool has 256"):
        small(pool=ValueTable(256, 24), n_keys=64, topk=4)
    with pytest.raises(ValueError, match="out_dim: the layer needs 12, the pool has 24"):
        small(pool=ValueTable(256, 24), value_dim=12)
    with pytest.raises(ValueError, match="sparse_grad: the layer needs True"):
        small(pool=ValueTable(256, 24), sparse_values=True)
    with pytest.raises(TypeError, match="pool must be a memlayers value store"):
        small(pool=torch.nn.Embedding(256, 24))
    assert small(pool=pool).store is pool


# --- configs, presets and bad input ---------------------------------------------------------------


def test_presets_scale_with_dim():
    assert preset("memory", 1024).key_dim == 512 and preset("memory", 1024).value_dim == 1024
    assert preset("memory_plus", 1024).gated and preset("memory_plus", 1024).num_values == 1024**2
    pkm = preset("pkm", 1024)
    assert (pkm.n_keys, pkm.heads, pkm.topk, pkm.key_dim, pkm.query_norm) == (512, 4, 32, 256, "batchnorm")
    assert preset("memory", 30).key_dim == 14


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(topk=17), "topk: must be in \\[1, n_keys=16\\]"),
        (dict(topk=0), "topk"),
        (dict(n_keys=0), "n_keys: must be >= 1"),
        (dict(key_dim=7), "key_dim: must be even"),
        (dict(heads=0), "heads"),
        (dict(value_dim=0), "value_dim"),
        (dict(query_norm="batch"), "query_norm: unknown 'batch'"),
        (dict(score_fn="tanh"), "score_fn: unknown 'tanh'"),
        (dict(value_dropout=1.0), "value_dropout"),
        (dict(usage_window=0), "usage_window"),
    ],
)
def test_impossible_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(dim=24, **{"n_keys": 16, "topk": 4, **kwargs})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_keys=16.5), "MemoryConfig.n_keys: must be an integer, got 16.5 (float); use e.g. 1024"),
        (dict(n_keys="16"), "MemoryConfig.n_keys: must be an integer, got '16' (str); use e.g. 1024"),
        (dict(dim=True), "MemoryConfig.dim: must be an integer, got True (bool); pass the model width"),
        (dict(topk=4.0), "MemoryConfig.topk: must be an integer, got 4.0 (float); use e.g. 32"),
        (dict(heads=None), "MemoryConfig.heads: must be an integer, got None (NoneType); use e.g. 4"),
        (dict(key_dim=8.0), "MemoryConfig.key_dim: must be an integer or None, got 8.0 (float); use None for the"),
        (dict(value_dim=False), "MemoryConfig.value_dim: must be an integer or None, got False (bool)"),
        (dict(usage_window=1e2), "MemoryConfig.usage_window: must be an integer, got 100.0 (float)"),
        (dict(query_bias=1), "MemoryConfig.query_bias: must be True or False, got 1 (int); use e.g. True"),
        (dict(qk_norm="yes"), "MemoryConfig.qk_norm: must be True or False, got 'yes' (str)"),
        (dict(gated=None), "MemoryConfig.gated: must be True or False, got None"),
        (dict(sparse_values=0), "MemoryConfig.sparse_values: must be True or False"),
        (dict(track_usage="false"), "MemoryConfig.track_usage: must be True or False"),
        (dict(input_dropout=True), "MemoryConfig.input_dropout: must be a number, got True (bool); use e.g. 0.0"),
        (dict(query_dropout="0.1"), "MemoryConfig.query_dropout: must be a number, got '0.1' (str)"),
        (dict(value_dropout=None), "MemoryConfig.value_dropout: must be a number"),
        (dict(query_norm=None), "MemoryConfig.query_norm: must be a string, got None (NoneType); use e.g. 'none'"),
        (dict(score_fn=1), "MemoryConfig.score_fn: must be a string, got 1 (int); use e.g. 'softmax'"),
    ],
)
def test_config_field_types(kwargs, message):
    with pytest.raises(ValueError) as e:
        MemoryConfig(**{"dim": 24, "n_keys": 16, "topk": 4, **kwargs})
    assert str(e.value).startswith(message)


def test_config_accepts_ints_for_floats_and_none_sizes():
    cfg = MemoryConfig(dim=24, n_keys=16, topk=4, key_dim=None, value_dim=None, input_dropout=0, value_dropout=0.5)
    assert (cfg.key_dim, cfg.value_dim, cfg.input_dropout) == (12, 24, 0)


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown memory preset 'hopfield'"):
        preset("hopfield", 64)
    with pytest.raises(ValueError, match="unknown MemoryConfig field\\(s\\) \\['nkeys'\\]"):
        preset("memory", 64, nkeys=3)
    with pytest.raises(ValueError, match="MemoryConfig.n_keys: must be an integer, got 16.5"):
        preset("memory", 64, n_keys=16.5)


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: (torch.randn(3, 23), None), ValueError, "expected input of shape \\(..., 24\\)"),
        (lambda: (torch.randint(0, 3, (3, 24)), None), TypeError, "floating point"),
        (lambda: (torch.randn(3, 24, dtype=torch.float64), None), TypeError, "call layer.to\\(torch.float64\\)"),
        (lambda: (torch.randn(3, 24, device="meta"), None), ValueError, "layer is on cpu"),
        (
            lambda: (torch.randn(3, 24), torch.ones(4, dtype=torch.bool)),
            ValueError,
            "mask must be a bool tensor of shape \\(3,\\)",
        ),
        (lambda: (torch.randn(3, 24), torch.ones(3)), ValueError, "mask must be a bool"),
    ],
)
def test_bad_layer_inputs(make, err, match):
    layer = small()
    x, mask = make()
    with pytest.raises(err, match=match):
        layer(x, mask)


def test_config_accepts_numpy_numbers_as_python_ones():
    np = pytest.importorskip("numpy")
    cfg = MemoryConfig(dim=np.int64(16), n_keys=np.int32(8), heads=2, topk=4, input_dropout=np.float32(0.25))
    assert (type(cfg.dim), type(cfg.n_keys), type(cfg.input_dropout)) == (int, int, float) and cfg.n_keys == 8


# --- every kind ---------------------------------------------------------------------------------

SMALL = {"n_keys": 8, "topk": 4}
TINY_OPTIONS = {
    "pkm": SMALL, "memory": SMALL, "memory_plus": SMALL, "peer": {**SMALL, "heads": 2},
    "ultramem": {**SMALL, "heads": 2}, "ultramem_v2": SMALL, "engram": {"hash_heads": 2, "d_ngram": 8, "table_size": 7},
}  # fmt: skip


def test_every_preset_has_tiny_options():
    assert set(TINY_OPTIONS) == set(memlayers.PRESETS)


@pytest.mark.parametrize("name", sorted(TINY_OPTIONS))
@pytest.mark.parametrize("lead", [(2, 5), (2, 0), (1, 1)])
def test_every_kind_runs_any_batch_and_declares_its_parts(name, lead):
    layer = MemoryLayer.from_preset(name, 24, **TINY_OPTIONS[name])
    x = torch.randn(*lead, 24, requires_grad=True)
    ids = torch.randint(0, 50, lead)
    y = layer(x, token_ids=ids)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y.sum() + (layer.aux_loss() or 0)).backward()
    assert x.grad.shape == x.shape
    groups = {g["name"]: g for g in memlayers.param_groups(layer, 1e-3)}
    assert groups["values"]["params"] and sum(len(g["params"]) for g in groups.values()) == len(
        list(layer.parameters())
    )
    assert layer.flops_per_token() > 0 and layer.reads_per_token() > 0
    assert layer.usage.num_slots == layer.addressing.num_slots


def test_a_readout_written_before_the_mask_argument_still_runs():
    from memlayers.memory.readouts.projected import ProjectedReadout

    class OldReadout(ProjectedReadout):
        def forward(self, y, x, lead=None, state=None):  # the interface before readouts took the padding mask
            return super().forward(y, x, lead, state)

    class OldConfig(MemoryConfig):
        def make_readout(self):
            return OldReadout(self.dim, self.value_dim, self.gated)

    torch.manual_seed(0)
    layer = MemoryLayer(OldConfig(dim=16, n_keys=4, heads=1, topk=2))
    torch.manual_seed(0)
    plain = MemoryLayer(MemoryConfig(dim=16, n_keys=4, heads=1, topk=2))
    x, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [False, True, True, True, True]])
    assert torch.equal(layer(x, mask=mask), plain(x, mask=mask))
