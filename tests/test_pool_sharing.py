"""Model-level value sharing: ``MemorySpec.pool`` with ``share`` ("all" | "ring:F" | "block:G"), and ``skip``."""

import copy

import pytest
import torch
from conftest import rel_err

import memlayers
import memlayers.memory.kinds.product_key  # registers memory / memory_plus
import memlayers.memory.kinds.ultramem_v2  # registers ultramem_v2
from memlayers.accounting import account
from memlayers.memory import MemoryLayer
from memlayers.memory.stores.peer_experts import PEERExperts
from memlayers.memory.stores.ring_window import RingWindow
from memlayers.memory.stores.value_table import ValueTable
from memlayers.model import MemorySpec, ModelConfig, Transformer
from memlayers.model.config import parse_share

OPTIONS = {"memory_plus": {"n_keys": 4, "heads": 2, "topk": 2}, "ultramem_v2": {"n_keys": 4, "topk": 2}}
N, L, DIM, V = 16, 4, 16, 40  # slots per layer (n_keys**2), memory layers, model width, vocab

pytestmark = pytest.mark.usefixtures("one_thread")


def build(kind: str, share: str, seed: int = 0, **options) -> Transformer:
    torch.manual_seed(seed)
    spec = MemorySpec(
        layers="all", preset=kind, pool="values", share=share, mode="beside", options=OPTIONS[kind] | options
    )
    return Transformer(ModelConfig(vocab_size=V, dim=DIM, n_layers=L, n_heads=2, max_seq_len=16, memories=[spec]))


def tokens(B=2, T=10, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def tables(pool) -> list[torch.nn.Parameter]:
    """The pool's "values" tables: V for a ValueTable, (U, V) for PEER experts."""
    return [pool.weight] if isinstance(pool, ValueTable) else [pool.u, pool.v]


def window_of(layer: MemoryLayer):
    """The RingWindow a layer reads through (memory_plus reads it directly, ultramem_v2 behind its P)."""
    store = layer.store
    return store if isinstance(store, RingWindow) else store.inner


def read_rows(layer: MemoryLayer, pool, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's output from the pool rows its slots map to, computed from the tables directly.

    rows (N,) int64: pool row of each of the layer's slots; x (T, dim) -> (T, dim).
    """
    ids, w = layer.retrieve(x)  # (T, H, k)
    r, w = rows[ids].flatten(1), w.flatten(1)  # (T, H*k)
    if isinstance(pool, ValueTable):
        y = (w[..., None] * pool.weight[r]).sum(1)
    else:
        px = x @ layer.store.proj.weight.T  # (T, d_p)
        y = ((w * (pool.u[r] * px[:, None]).sum(-1))[..., None] * pool.v[r]).sum(1)
    return layer.readout(y.to(x.dtype), x)


def ring_rows(j: int, f: float, rows: int) -> torch.Tensor:
    """Pool rows of layer j's slots 0..N-1 under "ring:f"."""
    return (round(j * f * N) + torch.arange(N)) % rows


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("kind", OPTIONS)
@pytest.mark.parametrize("f", [0.5, 0.3, 0.1, 1.0])
def test_ring_layout_and_reads(kind, f):
    model = build(kind, f"ring:{f:g}").eval()
    rows = max(N, round(L * f * N))
    assert model.pools.names() == ["values"]
    pool = model.pools["values"]
    assert pool.num_slots == rows and model.pool_of == {j: "values" for j in range(L)}
    assert all(t.shape[0] == rows for t in tables(pool))
    x = torch.randn(24, DIM)
    for j, layer in model.memory_layers():
        w = window_of(layer)
        assert isinstance(w, RingWindow) and w.inner is pool and layer.store.root() is pool
        assert (w.offset, w.num_slots) == (round(j * f * N) % rows, N)
        assert layer.config.num_slots == N
        assert rel_err(layer(x), read_rows(layer, pool, ring_rows(j, f, rows), x)) < 1e-5, j
    if f == 0.5:  # the last window wraps around the end of the ring: make sure a wrapped slot is read
        ids, _ = model.blocks[3].memory.retrieve(x)
        assert (ids + 24 >= rows).any()


@pytest.mark.parametrize("kind", OPTIONS)
@pytest.mark.parametrize("f", [0.5, 1.0])
def test_ring_windows_overlap_or_not(kind, f):
    model = build(kind, f"ring:{f:g}").eval()
    pool = model.pools["values"]
    rows = pool.num_slots
    windows = [set(ring_rows(j, f, rows).tolist()) for j in range(L)]
    if f == 1.0:  # disjoint windows tiling the pool
        assert rows == L * N and set().union(*windows) == set(range(rows))
        assert all(not (windows[a] & windows[b]) for a in range(L) for b in range(a + 1, L))
    else:  # every row is read by 1/F = 2 layers
        assert rows == 32 and all(sum(r in w for w in windows) == 2 for r in range(rows))
    x = torch.randn(24, DIM)
    for j, layer in model.memory_layers():  # a layer's gradient lands in its own window only
        grads = torch.autograd.grad(layer(x).square().sum(), tables(pool))
        for g in grads:
            hit = set(g.abs().sum(-1).nonzero().flatten().tolist())
            assert hit and hit <= windows[j], j


@pytest.mark.parametrize("kind", OPTIONS)
@pytest.mark.parametrize("g", [2, 3])
def test_block_sharing(kind, g):
    model = build(kind, f"block:{g}").eval()
    names = [f"values_{b}" for b in range(-(-L // g))]
    assert model.pools.names() == names
    assert model.pool_of == {j: f"values_{j // g}" for j in range(L)}
    x = torch.randn(8, DIM)
    for j, layer in model.memory_layers():
        pool = model.pools[f"values_{j // g}"]
        assert pool.num_slots == N and layer.store.root() is pool
        assert not any(isinstance(m, RingWindow) for m in (layer.store, getattr(layer.store, "inner", None)))
        assert rel_err(layer(x), read_rows(layer, pool, torch.arange(N), x)) < 1e-5, j
    readers = [sum(model.pool_of[j] == name for j in range(L)) for name in names]
    assert readers == ([2, 2] if g == 2 else [3, 1])
    first, second = (model.pools[n] for n in names)
    assert all(a is not b for a, b in zip(tables(first), tables(second)))


@pytest.mark.parametrize("kind", OPTIONS)
def test_all_shares_one_pool(kind):
    model = build(kind, "all").eval()
    pool = model.pools["values"]
    assert model.pools.names() == ["values"] and pool.num_slots == N
    assert isinstance(pool, ValueTable if kind == "memory_plus" else PEERExperts)
    x = torch.randn(8, DIM)
    for j, layer in model.memory_layers():
        assert layer.store.root() is pool
        if kind == "memory_plus":
            assert layer.store is pool and "store" not in layer._modules
        else:  # each layer keeps its own P in front of the shared tables
            assert layer.store.inner is pool and "inner" not in layer.store._modules
        assert rel_err(layer(x), read_rows(layer, pool, torch.arange(N), x)) < 1e-5, j
    projections = [id(layer.store.proj.weight) for _, layer in model.memory_layers()] if kind == "ultramem_v2" else []
    assert len(set(projections)) == len(projections)


# ---------------------------------------------------------------- ownership: state_dict, parameters, gradients

SHARES = ["all", "ring:0.5", "block:2"]


@pytest.mark.parametrize("kind", OPTIONS)
@pytest.mark.parametrize("share", SHARES)
def test_pool_is_stored_and_counted_once(kind, share):
    model = build(kind, share)
    sd = model.state_dict()
    pool_keys = sorted(k for k in sd if k.startswith("pools."))
    suffixes = ["weight"] if kind == "memory_plus" else ["u", "v"]
    assert pool_keys == sorted(f"pools.{n}.{s}" for n in model.pools.names() for s in suffixes)
    for name in model.pools.names():
        for t in tables(model.pools[name]):
            aliases = [k for k, v in sd.items() if v.data_ptr() == t.data_ptr()]
            assert len(aliases) == 1 and aliases[0].startswith(f"pools.{name}."), aliases
            assert sum(p is t for p in model.parameters()) == 1
    pooled = [t for n in model.pools.names() for t in tables(model.pools[n])]
    groups = memlayers.param_groups(model, 1e-3)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    (values,) = [g for g in groups if g["name"] == "values"]
    assert [id(p) for p in values["params"]] == [id(t) for t in pooled]
    assert account(model, 16).memory_params == sum(t.numel() for t in pooled)


def _capture_memory_io(model):
    """Hooks keeping every memory layer's input (detached) and output (its .grad retained)."""
    seen, handles = {}, []
    for j, layer in model.memory_layers():

        def hook(module, args, out, j=j):
            out.retain_grad()
            seen[j] = (args[0].detach(), out)

        handles.append(layer.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("kind", OPTIONS)
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_from_all_layers_accumulate(kind, share, sparse):
    model = build(kind, share, sparse_values=sparse).eval()
    seen, handles = _capture_memory_io(model)
    model(tokens(), tokens(seed=1)).loss.backward()
    for h in handles:
        h.remove()
    want = {id(t): torch.zeros_like(t) for n in model.pools.names() for t in tables(model.pools[n])}
    for j, layer in model.memory_layers():  # each layer's own contribution, its input and upstream gradient fixed
        x, out = seen[j]
        pool = model.pools[model.pool_of[j]]
        parts = torch.autograd.grad((layer(x) * out.grad).sum(), tables(pool))
        for t, g in zip(tables(pool), parts):
            g = g.to_dense()
            assert g.abs().sum() > 0, j
            want[id(t)] += g
    for name in model.pools.names():
        for t in tables(model.pools[name]):
            assert t.grad.is_sparse == sparse
            assert rel_err(t.grad, want[id(t)]) < 1e-5, name
    if sparse:
        opt = memlayers.build_optimizer(model, 1e-3, value_optimizer="sparse_adam")
        before = [t.detach().clone() for n in model.pools.names() for t in tables(model.pools[n])]
        opt.step()
        after = [t for n in model.pools.names() for t in tables(model.pools[n])]
        assert all(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("kind", OPTIONS)
@pytest.mark.parametrize("share", SHARES)
def test_deepcopy_keeps_the_sharing(kind, share):
    model = build(kind, share).eval()
    twin = copy.deepcopy(model)
    idx = tokens()
    assert torch.equal(twin(idx).logits, model(idx).logits)
    assert twin.pool_of == model.pool_of
    for (j, a), (_, b) in zip(model.memory_layers(), twin.memory_layers()):
        name = model.pool_of[j]
        assert b.store.root() is twin.pools[name] and b.store.root() is not a.store.root()
        if share.startswith("ring"):
            assert window_of(b) is not window_of(a) and window_of(b).offset == window_of(a).offset
    x = torch.randn(6, DIM)
    before = {j: layer(x) for j, layer in twin.memory_layers()}
    with torch.no_grad():
        for name in twin.pools.names():
            for t in tables(twin.pools[name]):
                t.add_(1.0)
    for (j, a), (_, b) in zip(model.memory_layers(), twin.memory_layers()):
        assert not torch.equal(b(x), before[j]), j  # every twin layer reads the twin's pool...
        assert torch.equal(a(x), before[j]), j  # ...and the original is untouched


@pytest.mark.parametrize("kind", OPTIONS)
@pytest.mark.parametrize("share", SHARES)
def test_to_float64_keeps_the_sharing(kind, share):
    model = build(kind, share).eval()
    idx = tokens()
    want = model(idx).logits
    model.to(torch.float64)
    assert model(idx).logits.dtype == torch.float64
    assert rel_err(model(idx).logits, want) < 1e-4
    x = torch.randn(6, DIM, dtype=torch.float64)
    for j, layer in model.memory_layers():
        pool = model.pools[model.pool_of[j]]
        assert layer.store.root() is pool and all(t.dtype == torch.float64 for t in tables(pool))
        rows = ring_rows(j, 0.5, pool.num_slots) if share == "ring:0.5" else torch.arange(N)
        assert rel_err(layer(x), read_rows(layer, pool, rows, x)) < 1e-12, j


@pytest.mark.parametrize("kind", OPTIONS)
@pytest.mark.parametrize("share", SHARES)
def test_load_state_dict_round_trip(kind, share):
    a, b = build(kind, share, seed=0).eval(), build(kind, share, seed=1).eval()
    idx = tokens()
    assert not torch.equal(a(idx).logits, b(idx).logits)
    result = b.load_state_dict(a.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(a(idx).logits, b(idx).logits)
    for j, layer in b.memory_layers():
        assert layer.store.root() is b.pools[b.pool_of[j]]


# ---------------------------------------------------------------- skip


def skip_model(skip: int = 1, layers: str = "2,3") -> Transformer:
    spec = MemorySpec(
        layers=layers, preset="memory", mode="beside", skip=skip, options={"n_keys": 4, "heads": 2, "topk": 2}
    )
    return Transformer(ModelConfig(vocab_size=V, dim=DIM, n_layers=L, n_heads=2, max_seq_len=16, memories=[spec]))


@pytest.mark.parametrize("skip", [1, 2])
def test_skip_reads_an_earlier_blocks_ffn_input(skip):
    model = skip_model(skip)
    assert model.memory_reads == {2: 2 - skip, 3: 3 - skip}
    norms, inputs, handles = {}, {}, []
    for b, block in enumerate(model.blocks):
        handles.append(block.ffn_norm.register_forward_hook(lambda m, args, out, b=b: norms.__setitem__(b, out)))
    for b, layer in model.memory_layers():
        handles.append(layer.register_forward_pre_hook(lambda m, args, b=b: inputs.__setitem__(b, args[0])))
    out = model(tokens(), tokens(seed=1))
    for h in handles:
        h.remove()
    assert sorted(inputs) == [2, 3]
    for b in (2, 3):
        assert torch.equal(inputs[b], norms[b - skip]), b
        assert not torch.allclose(inputs[b], norms[b]), b  # not its own block's
    out.loss.backward()  # the lookup's gradient reaches the earlier block
    assert model.blocks[2 - skip].ffn_norm.weight.grad.abs().sum() > 0


def test_skip_zero_reads_its_own_block():
    model = skip_model(0)
    assert model.memory_reads == {}
    seen = {}
    model.blocks[2].ffn_norm.register_forward_hook(lambda m, args, out: seen.__setitem__("norm", out))
    model.blocks[2].memory.register_forward_pre_hook(lambda m, args: seen.__setitem__("memory", args[0]))
    model(tokens())
    assert torch.equal(seen["memory"], seen["norm"])


def test_skip_before_block_zero():
    with pytest.raises(ValueError, match=r"^memories\[0\]\.skip: layer\(s\) \[0, 1\] would read block\(s\) \[-2, -1\]"):
        skip_model(2, "0,1,3")
    ok = MemorySpec(layers="0", preset="memory", options={"n_keys": 4, "heads": 2, "topk": 2})
    bad = MemorySpec(layers="2", preset="memory", skip=3, options={"n_keys": 4, "heads": 2, "topk": 2})
    with pytest.raises(ValueError, match=r"^memories\[1\]\.skip: ") as err:
        ModelConfig(vocab_size=V, dim=DIM, n_layers=L, n_heads=2, memories=[ok, bad])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("skip", [-1, True, 1.5, "1"])
def test_bad_skip(skip):
    with pytest.raises(ValueError, match=r"^MemorySpec\.skip: must be an integer >= 0"):
        MemorySpec(layers="2", preset="memory", skip=skip)


# ---------------------------------------------------------------- share and pool errors


@pytest.mark.parametrize(
    "text, parsed",
    [("all", ("all", 1)), ("ring:0.5", ("ring", 0.5)), ("ring:1", ("ring", 1.0)), ("block:2", ("block", 2)),
     (" Block:3 ", ("block", 3))],
)  # fmt: skip
def test_parse_share(text, parsed):
    assert parse_share(text) == parsed


@pytest.mark.parametrize(
    "share", ["ring:0", "ring:2", "block:0", "blah", "ring:", "ring:-0.5", "block:1.5", "ring:nan"]
)
def test_bad_share_strings(share):
    with pytest.raises(ValueError, match=rf"^MemorySpec\.share: share '{share}': expected 'all'") as err:
        MemorySpec(layers="all", pool="values", share=share)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=rf"^memories\[0\]: MemorySpec\.share: share '{share}'"):
        ModelConfig(
            vocab_size=V, dim=DIM, n_layers=L, n_heads=2, memories=[{"layers": "all", "pool": "values", "share": share}]
        )
    cfg = ModelConfig(vocab_size=V, dim=DIM, n_layers=L, n_heads=2, memories=[MemorySpec(layers="all", pool="values")])
    cfg.memories[0].share = share  # edited in place: the Transformer revalidates
    with pytest.raises(ValueError, match=r"^memories\[0\]\.share: "):
        Transformer(cfg)


@pytest.mark.parametrize("share", ["ring:0.5", "block:2"])
def test_share_needs_a_pool(share):
    with pytest.raises(ValueError, match=rf"^MemorySpec\.share: '{share}' needs a pool; set pool"):
        MemorySpec(layers="all", share=share)
    cfg = ModelConfig(
        vocab_size=V, dim=DIM, n_layers=L, n_heads=2, memories=[MemorySpec(layers="all", pool="p", share=share)]
    )
    cfg.memories[0].pool = None
    with pytest.raises(ValueError, match=r"^memories\[0\]\.share: "):
        cfg.validate()


def test_share_all_is_case_insensitive_without_a_pool():
    assert parse_share("ALL") == ("all", 1)
    MemorySpec(layers="all", share="ALL")


# an instance attribute of every Module, a method of Pools and a private Module field are refused too
@pytest.mark.parametrize(
    "pool", ["to", "train", "parameters", "1x", "has-dash", "", 3, "training", "names", "_modules"]
)
def test_bad_pool_names(pool):
    with pytest.raises(ValueError, match=r"^MemorySpec\.pool: must be None or a name") as err:
        MemorySpec(layers="all", pool=pool)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^memories\[0\]: MemorySpec\.pool: "):
        ModelConfig(vocab_size=V, dim=DIM, n_layers=L, n_heads=2, memories=[{"layers": "all", "pool": pool}])


def test_pool_names_that_are_fine():
    spec = MemorySpec(
        layers="all", preset="memory_plus", pool="shared_1", share="block:2", options=OPTIONS["memory_plus"]
    )
    model = Transformer(ModelConfig(vocab_size=V, dim=DIM, n_layers=L, n_heads=2, max_seq_len=16, memories=[spec]))
    assert model.pools.names() == ["shared_1_0", "shared_1_1"]
    assert model.pools.shared_1_0 is model.pools["shared_1_0"]
    assert model(tokens()).logits.shape == (2, 10, V)


def test_pools_read_like_a_mapping():
    model = build("memory_plus", "block:2")
    assert list(model.pools) == model.pools.names() == ["values_0", "values_1"] and len(model.pools) == 2
    assert "values_0" in model.pools and "values" not in model.pools
    assert dict(model.pools.items())["values_1"] is model.pools["values_1"]
    with pytest.raises(KeyError, match=r"no pool 'nope'; the model's pools: \['values_0', 'values_1'\]"):
        model.pools["nope"]
