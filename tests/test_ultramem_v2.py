"""The "ultramem_v2" kind: a layer's output against the definition, its defaults, roles, optimizers,
accounting, checkpoints."""

import math

import pytest
import torch
from conftest import rel_err
from torch.func import functional_call

import memlayers
import memlayers.memory.kinds.ultramem_v2  # registers the kind and preset
from memlayers.accounting import memory_flops
from memlayers.memory import MemoryLayer, preset
from memlayers.memory.addressing.tucker import TuckerProductKeys
from memlayers.memory.kinds.ultramem_v2 import UltraMemV2Config
from memlayers.memory.stores.peer_experts import PEERExperts
from memlayers.memory.stores.projected_input import ProjectedInput
from memlayers.optim import parameter_roles

SMALL = {"n_keys": 4, "topk": 2}
# (dim, overrides): the preset's 1 head; then odd sizes, 2 heads, rank 3 and a prefilter below n_keys
SHAPES = [(16, SMALL), (18, {"n_keys": 5, "topk": 3, "heads": 2, "rank": 3, "prefilter": 4})]


def small_layer(dim: int = 16, **kw) -> MemoryLayer:
    return MemoryLayer.from_preset("ultramem_v2", dim, **(SMALL | kw))


def naive(layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    """The definition from the layer's own retrieval: ``W_out(Σ_{h,k} w · (U[id]·(P x)) · V[id]) + b``.

    x (..., dim) -> (..., dim), token by token and slot by slot (a test reference: it gathers rows).
    """
    ids, w = layer.retrieve(x)  # (..., H, k) each
    store = layer.store
    dim = x.shape[-1]
    flat_ids, flat_w = ids.reshape(-1, ids.shape[-2] * ids.shape[-1]), w.reshape(-1, w.shape[-2] * w.shape[-1])
    px = x.reshape(-1, dim) @ store.proj.weight.T  # (T, d_p)
    u, v = store.inner.u[flat_ids], store.inner.v[flat_ids]  # (T, H*k, d_p), (T, H*k, d_v)
    pre = (u * px[:, None, :]).sum(-1)  # (T, H*k): U[id]·(P x)
    y = ((flat_w * pre)[..., None] * v).sum(1)  # (T, d_v)
    out = layer.readout.out_proj
    return (y @ out.weight.T + out.bias).reshape(x.shape)


# ---------------------------------------------------------------- the definition


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dim, overrides", SHAPES)
def test_output_and_gradients_match_the_definition(dim, overrides, sparse):
    layer = MemoryLayer.from_preset("ultramem_v2", dim, sparse_values=sparse, **overrides).eval()
    x = torch.randn(3, 5, dim, requires_grad=True)
    g = torch.randn(3, 5, dim)
    params = [p for _, p in sorted(layer.named_parameters())]
    got = layer(x)
    want = naive(layer, x)
    assert got.shape == x.shape
    assert rel_err(got, want) < 1e-5
    got_grads = torch.autograd.grad((got * g).sum(), [x, *params])
    want_grads = torch.autograd.grad((want * g).sum(), [x, *params])
    names = ["x", *sorted(dict(layer.named_parameters()))]
    for name, a, b in zip(names, got_grads, want_grads):
        assert rel_err(a, b) < 1e-5, name
    if sparse:
        u_grad = got_grads[1 + names[1:].index("store.inner.u")]
        assert u_grad.is_sparse


def test_gradcheck_float64():
    layer = small_layer(dim=8, n_keys=3, topk=2, heads=2).double().eval()
    names = ["store.inner.u", "store.inner.v", "store.proj.weight", "readout.out_proj.weight",
             "readout.out_proj.bias", "addressing.keys", "addressing.cores", "addressing.query.weight"]  # fmt: skip
    own = dict(layer.named_parameters())
    assert set(names) <= set(own)
    inputs = [torch.randn(3, 8, dtype=torch.float64, requires_grad=True)]
    inputs += [own[n].detach().clone().requires_grad_() for n in names]

    def f(x, *tensors):
        return functional_call(layer, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert rel_err(f(*inputs), naive(layer, inputs[0])) < 1e-12


@pytest.mark.parametrize("T", [1, 2])
def test_tiny_batches(T):
    layer = small_layer().eval()
    x = torch.randn(T, 16, requires_grad=True)
    y = layer(x)
    assert rel_err(y, naive(layer, x)) < 1e-5
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_empty_batch():
    layer = small_layer()
    x = torch.randn(0, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


def test_one_query_per_rank():
    layer = small_layer(dim=16, heads=2, rank=3)
    a = layer.addressing
    assert isinstance(a, TuckerProductKeys) and a.query_per_rank and a.query_ranks == 3
    assert a.query.out_features == 2 * 3 * a.key_dim  # heads x rank x (row half + column half)
    assert preset("ultramem", 16, heads=2, rank=3, **SMALL).make_addressing().query.out_features == 2 * a.key_dim
    # head 1's rank-1 query is its own rows of W_q: changing them moves that head's rank-1 scores only
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = a.side_scores(x)
        rows = slice((1 * 3 + 1) * a.key_dim, (1 * 3 + 2) * a.key_dim)  # q.view(T, heads, rank, side, half)
        a.query.weight[rows] += 1.0
        after = a.side_scores(x)
    for b, c in zip(before, after):
        changed = (b - c).abs().amax(dim=(0, 3)) > 1e-6  # (heads, rank)
        assert changed.tolist() == [[False, False, False], [False, True, False]]


# ---------------------------------------------------------------- config and defaults


def test_preset_defaults():
    c = preset("ultramem_v2", 512)
    assert isinstance(c, UltraMemV2Config) and c.kind == "ultramem_v2"
    assert (c.n_keys, c.heads, c.topk, c.key_dim, c.rank, c.cores, c.expansion) == (1024, 1, 32, 256, 2, 1, 1)
    assert (c.value_dim, c.pre_dim, c.num_slots, c.num_values) == (256, 85, 1024**2, 1024**2)
    assert c.aux_weight == 0 and c.value_lr_start == 1 and c.lr_decay is None
    assert c.score_fn == "identity" and c.query_norm == "layernorm" and not c.query_bias
    assert preset("ultramem_v2", 16, **SMALL).pre_dim == 8 // 3
    assert preset("ultramem_v2", 16, **SMALL, value_dim=12).pre_dim == 4  # derived from the value_dim given
    assert preset("ultramem_v2", 4, **SMALL).pre_dim == 1  # value_dim 2: at least 1
    assert preset("ultramem_v2", 16, **SMALL, pre_dim=5).pre_dim == 5


def test_parts_and_init():
    layer = small_layer(n_layers=None)
    a, s, r = layer.parts()
    assert isinstance(s, ProjectedInput) and isinstance(s.inner, PEERExperts) and "inner" in s._modules
    assert s.inner.activation == "identity" and (s.inner.num_experts, s.inner.in_dim, s.inner.out_dim) == (16, 2, 8)
    assert (s.num_slots, s.out_dim, s.proj.in_features, s.proj.out_features) == (16, 8, 16, 2)
    assert s.proj.bias is None and s.root() is s.inner and s.lr_decay is None and not s.sparse_grad
    assert (a.num_slots, a.grid, a.num_cores, a.prefilter) == (16, 4, 1, 2)
    assert r.out_proj.in_features == 8 and r.gate_proj is None
    ids, w = layer.retrieve(torch.randn(2, 3, 16))
    assert ids.shape == w.shape == (2, 3, 1, 2)  # one core: a single weight per slot
    c = preset("ultramem_v2", 32, n_keys=64, topk=4, heads=2).in_model(3, 100)
    assert c.n_layers == 3 and c.value_init_std == math.sqrt(1 / (2 * 4 * 2 * 3))
    big = MemoryLayer(c).store.inner
    assert abs(big.v.std().item() - c.value_init_std) < 0.03 * c.value_init_std
    assert abs(big.u.std().item() - c.pre_dim**-0.5) < 0.03 * c.pre_dim**-0.5


def test_no_aux_loss_by_default():
    layer = small_layer()
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.aux_loss() is None
    penalised = small_layer(aux_weight=0.01)
    aux = penalised.aux_loss()
    assert aux is not None and aux.dim() == 0 and aux.item() >= 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"expansion": 2}, "expansion"),
        ({"expansion": 4}, "expansion"),
        ({"cores": 2}, "cores"),
        ({"cores": 4}, "cores"),
        ({"pre_dim": 0}, "pre_dim"),
        ({"pre_dim": 1.5}, "pre_dim"),
        ({"rank": 0}, "rank"),
        ({"value_lr_start": 0.0}, "value_lr_start"),
    ],
)
def test_bad_configs(overrides, field):
    with pytest.raises(ValueError, match=rf"^UltraMemV2Config\.{field}: ") as err:
        preset("ultramem_v2", 16, **(SMALL | overrides))
    assert "\n" not in str(err.value)


def test_expansion_and_cores_errors_point_to_ultramem():
    for name in ("expansion", "cores"):
        with pytest.raises(ValueError, match=rf"UltraMemV2Config\.{name}: must be 1, got 2; .*ultramem preset"):
            preset("ultramem_v2", 16, **SMALL, **{name: 2})


# ---------------------------------------------------------------- parameter roles and optimizers


def test_param_roles_and_groups():
    layer = small_layer()
    u, v, proj = layer.store.inner.u, layer.store.inner.v, layer.store.proj.weight
    keys, cores = layer.addressing.keys, layer.addressing.cores
    roles = parameter_roles(layer)
    assert [id(p) for p in roles["values"]] == [id(u), id(v)]
    assert [id(p) for p in roles["keys"]] == [id(keys), id(cores)]
    assert layer.store.param_roles() == {"dense": [proj]}
    groups = {g["name"]: g for g in memlayers.param_groups(layer, 1e-3)}
    assert [id(p) for p in groups["values"]["params"]] == [id(u), id(v)]
    assert groups["values"]["lr"] == pytest.approx(1e-2) and groups["values"]["weight_decay"] == 0.0
    assert "lr_decay" not in groups["values"]
    assert [id(p) for p in groups["subkeys"]["params"]] == [id(keys), id(cores)]
    assert id(proj) in {id(p) for p in groups["decay"]["params"]}
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in layer.parameters())  # each parameter in exactly one group


def test_value_lr_decay_is_an_option():
    layer = small_layer(value_lr_start=4.0, value_lr_decay_frac=0.5)
    assert layer.store.lr_decay == layer.store.inner.lr_decay == (4.0, 0.5)
    groups = {g["name"]: g for g in memlayers.param_groups(layer, 1e-3)}
    # peaks at value_lr (10 x lr by default) and falls to value_lr / start
    assert groups["values"]["lr_decay"] == (4.0, 0.5) and groups["values"]["lr"] == pytest.approx(1e-2 / 4)


def test_sparse_values_with_sparse_adam():
    layer = small_layer(sparse_values=True, n_keys=6)
    inner = layer.store.inner
    assert layer.store.sparse_grad and inner.sparse_grad
    with pytest.raises(ValueError, match="sparse"):
        memlayers.build_optimizer(layer, 1e-3)  # AdamW cannot take the sparse gradients
    opt = memlayers.build_optimizer(layer, 1e-3, value_optimizer="sparse_adam")
    x = torch.randn(3, 16)
    ids, _ = layer.retrieve(x)
    touched = torch.zeros(inner.num_experts, dtype=torch.bool)
    touched[ids.flatten().unique()] = True
    assert not touched.all()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    layer(x).square().sum().backward()
    assert inner.u.grad.is_sparse and inner.v.grad.is_sparse and not layer.store.proj.weight.grad.is_sparse
    opt.step()
    for table, name in ((inner.u, "store.inner.u"), (inner.v, "store.inner.v")):
        moved = (table.detach() != before[name]).any(-1)
        assert torch.equal(moved, touched), name  # exactly the rows read moved
    assert not torch.equal(layer.store.proj.weight, before["store.proj.weight"])


# ---------------------------------------------------------------- accounting and checkpoints


def test_flops_and_reads():
    layer = small_layer(dim=18, n_keys=5, topk=3, heads=2, pre_dim=4)
    a, s, r = layer.parts()
    reads, dim, d_p, d_v = 2 * 3, 18, 4, 9
    store_flops = 2 * dim * d_p + 2 * reads * d_p + 2 * reads * d_v  # P x, the dots U[id]·(P x), the bag over V
    assert s.read_flops(reads) == store_flops
    assert r.flops_per_token() == 2 * d_v * dim
    assert layer.flops_per_token() == a.flops_per_token() + store_flops + 2 * d_v * dim
    assert memory_flops(layer) == layer.flops_per_token()
    assert layer.reads_per_token() == reads * (d_p + d_v)
    one_query = TuckerProductKeys(dim, 5, 2, 3, a.key_dim, rank=2, cores=1, query_per_rank=False)
    assert a.flops_per_token() - one_query.flops_per_token() == 2 * dim * 2 * (2 - 1) * a.key_dim


@pytest.mark.parametrize("sparse", [False, True])
def test_state_dict_round_trip(sparse):
    torch.manual_seed(0)
    a = small_layer(sparse_values=sparse)
    torch.manual_seed(1)
    b = small_layer(sparse_values=sparse)
    keys = set(a.state_dict())
    assert {"store.inner.u", "store.inner.v", "store.proj.weight", "readout.out_proj.weight"} <= keys
    assert {"addressing.keys", "addressing.cores", "addressing.u", "addressing.v", "addressing.svd_step"} <= keys
    x = torch.randn(6, 16)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        a(x).square().mean().backward()
        opt.step()
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert b.addressing.svd_step.item() == a.addressing.svd_step.item() == 3
    for layer in (a, b):
        layer.eval()
    assert torch.equal(a(x), b(x))
