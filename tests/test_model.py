"""The decoder (memlayers.model): config validation, placements, shapes, causality, MoE routing, memory slots."""

import math

import pytest
import torch
import torch.nn.functional as F

from memlayers import MemoryLayer, ValueTable
from memlayers.model import MemorySpec, ModelConfig, MoE, MoESpec, Transformer, parse_placement
from memlayers.model.transformer import SwiGLU

V = 50


def tiny(**overrides) -> ModelConfig:
    base = {"vocab_size": V, "dim": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 16}
    return ModelConfig(**{**base, **overrides})


def mem(layers: str, **kw) -> MemorySpec:
    options = kw.pop("options", {"n_keys": 8, "heads": 2, "topk": 4})
    return MemorySpec(layers=layers, options=options, **kw)


MOE = MoESpec(layers="1,3", experts=4, topk=2, hidden=16)
VARIANTS = {
    "dense": {},
    "moe": {"moe": MOE},
    "memory": {"memories": [mem("1", pool="p"), mem("3", pool="p", mode="beside")]},
}


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- placements and config


@pytest.mark.parametrize(
    "text, n, expected",
    [("", 4, ()), ("  ", 4, ()), ("all", 3, (0, 1, 2)), ("3,1", 4, (1, 3)), (" 0 , 2 ", 4, (0, 2)), ("2", 4, (2,)),
     ("center:3:8", 24, (4, 12, 20)), ("center:1:5", 4, (2,)), ("center:2:1", 4, (2, 3)), ("center:2:2", 4, (1, 3)),
     ("center:3:1", 5, (1, 2, 3)), ("center:4:2", 12, (3, 5, 7, 9)),
     # the spec's first layer would overhang the last block: shifted down just enough
     ("center:4:1", 4, (0, 1, 2, 3)), ("center:2:3", 4, (0, 3))],
)  # fmt: skip
def test_parse_placement(text, n, expected):
    assert parse_placement(text, n) == expected


@pytest.mark.parametrize(
    "text, match",
    [("4", "out of range"), ("-1", "out of range"), ("1,1", "more than once"), ("a", "not a layer id"),
     ("1,,2", "not a layer id"), ("1.5", "not a layer id"), ("center:3", "center:K:S"), ("center:0:1", ">= 1"),
     ("center:3:2", "more than"), ("center:x:1", "center:K:S")],
)  # fmt: skip
def test_parse_placement_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_placement(text, 4)


def test_config_defaults_and_hidden():
    cfg = ModelConfig()
    assert cfg.vocab_size is None and cfg.hidden == 352  # 8/3*128 = 341.3 -> 341 -> next multiple of 16
    assert ModelConfig(dim=96, multiple_of=64).hidden == 256  # 256 exactly
    assert ModelConfig(ffn_hidden=100).hidden == 100
    assert ModelConfig(moe=MoESpec(hidden=7)).expert_hidden == 7 and ModelConfig().expert_hidden == 352
    assert ModelConfig(moe={"layers": "1"}).moe_layers == (1,)  # dicts are accepted for nested specs
    assert isinstance(ModelConfig(memories=[{"layers": "1"}]).memories[0], MemorySpec)


@pytest.mark.parametrize(
    "overrides, match",
    [({"vocab_size": 0}, "vocab_size"), ({"dim": 0}, "dim"), ({"n_heads": 3}, "n_heads"),
     ({"dim": 24, "n_heads": 8}, "n_heads"), ({"ffn_hidden": 0}, "ffn_hidden"), ({"dropout": 1.0}, "dropout"),
     ({"init_std": 0.0}, "init_std"), ({"max_seq_len": 0}, "max_seq_len"), ({"rope_theta": -1.0}, "rope_theta"),
     ({"moe": MoESpec(layers="9")}, r"moe\.layers.*out of range"),
     ({"memories": [MemorySpec(layers="x")]}, r"memories\[0\]\.layers"),
     ({"memories": [MemorySpec(layers="1", options={"n_keys": 4, "topk": 8})]}, r"memories\[0\]\.options.*topk"),
     ({"memories": [{"layers": "1", "options": {"nkeys": 4}}]}, r"memories\[0\].*nkeys.*valid fields"),
     # conflicts
     ({"moe": MoESpec(layers="1"), "memories": [MemorySpec(layers="0,1")]}, r"layer\(s\) \[1\] have both MoE"),
     ({"moe": MoESpec(layers="1"), "memories": [MemorySpec(layers="1", mode="beside")]}, "both MoE"),
     ({"memories": [MemorySpec(layers="1,2"), MemorySpec(layers="2")]},
      r"memories\[1\].*layer 2 already.*memories\[0\]"),
     ({"memories": [mem("1", pool="p"), mem("2", pool="p", options={"n_keys": 16, "heads": 2, "topk": 4})]},
      r"memories\[1\]\.pool.*num_slots=64 vs 256"),
     ({"memories": [mem("1", pool="p"), mem("2", pool="p", options={"n_keys": 8, "topk": 4, "value_dim": 16})]},
      "out_dim=.* vs 16"),
     ],
)  # fmt: skip
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{"n_layers": 4, **overrides})


@pytest.mark.parametrize(
    "make, match",
    [(lambda: MoESpec(experts=0), r"MoESpec\.experts"), (lambda: MoESpec(experts=2, topk=3), r"MoESpec\.topk"),
     (lambda: MoESpec(hidden=0), "hidden"), (lambda: MoESpec(aux_weight=-1.0), "aux_weight"),
     (lambda: MemorySpec(preset="nope"), r"MemorySpec\.preset.*memory_plus"),
     (lambda: MemorySpec(mode="inside"), r"MemorySpec\.mode.*replace"), (lambda: MemorySpec(pool=""), "pool"),
     (lambda: MemorySpec(options={"nkeys": 4}), r"MemorySpec\.options.*nkeys.*valid fields"),
     (lambda: MemorySpec(options={"dim": 4}), r"MemorySpec\.options.*dim")],
)  # fmt: skip
def test_spec_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_is_revalidated_by_the_transformer():
    cfg = tiny()
    cfg.n_heads = 5  # edited in place after construction
    with pytest.raises(ValueError, match="n_heads"):
        Transformer(cfg)
    with pytest.raises(ValueError, match="vocab_size.*None"):
        Transformer(tiny(vocab_size=None))


def test_omegaconf_structured_round_trip():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(
        schema, OmegaConf.from_dotlist(["vocab_size=100", "moe.layers=1", "memories=[{layers: '2', pool: a}]"])
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig) and isinstance(cfg.memories[0], MemorySpec)
    assert cfg.moe_layers == (1,) and cfg.memories[0].pool == "a" and cfg.vocab_size == 100
    bad = OmegaConf.merge(schema, OmegaConf.from_dotlist(["moe.layers=2", "memories=[{layers: '2'}]"]))
    with pytest.raises(ValueError, match="both MoE"):
        OmegaConf.to_object(bad)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_loss(variant):
    model = Transformer(tiny(**VARIANTS[variant]))
    idx, targets = tokens(), tokens(seed=1)
    out = model(idx)
    assert out.logits.shape == (2, 12, V) and out.logits.dtype == torch.float32 and out.loss is None
    assert out.aux_loss.shape == () and (out.aux_loss.item() > 0) == (variant == "moe")
    targets[0, :5] = -100
    out = model(idx, targets)
    keep = targets != -100
    manual = -out.logits.log_softmax(-1)[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits.transpose(1, 2), targets).item(), rel=1e-5)
    assert model(idx, torch.full_like(idx, -100)).loss.item() == 0.0  # nothing to predict: 0, not NaN


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("train", [False, True])
def test_causal(variant, train):
    model = Transformer(tiny(**VARIANTS[variant])).train(train)
    a = tokens(T=12)
    b = a.clone()
    t = 7
    b[:, t] = (a[:, t] + 1) % V
    la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :t], lb[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(la[:, t:], lb[:, t:])  # and position t onwards does see the change


def test_batch_independent_in_eval_with_moe_and_memory():
    model = Transformer(tiny(moe=MOE, memories=[mem("2")])).eval()
    idx = tokens(B=3)
    torch.testing.assert_close(model(idx).logits[1:2], model(idx[1:2]).logits, rtol=1e-5, atol=1e-6)


def test_input_errors():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(T=17))
    with pytest.raises(ValueError, match="vocab_size=50"):
        model(torch.full((1, 3), V))
    with pytest.raises(ValueError, match=r"\[0, vocab_size"):
        model(torch.full((1, 3), -1))
    with pytest.raises(TypeError, match="int64"):
        model(tokens().float())
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(tokens()[0])
    with pytest.raises(ValueError, match="targets"):
        model(tokens(), tokens()[:, :5])
    with pytest.raises(ValueError, match=r"targets must hold token ids .* or -100 \(ignored\), got 50"):
        model(tokens(B=1, T=4), torch.tensor([[1, 2, -100, V]]))
    with pytest.raises(ValueError, match="got -3"):
        model(tokens(B=1, T=4), torch.tensor([[1, 2, -100, -3]]))
    model(tokens(T=16))  # max_seq_len itself is fine
    model(tokens(B=1, T=4), torch.tensor([[1, 2, -100, V - 1]]))  # -100 targets are ignored


def test_tied_and_untied_embeddings():
    tied, untied = Transformer(tiny()), Transformer(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(untied) - n(tied) == V * 32
    assert "lm_head.weight" in untied.state_dict()


def test_init():
    torch.manual_seed(0)
    model = Transformer(tiny(dim=64, n_layers=8, memories=[mem("2", options={"n_keys": 16, "heads": 2, "topk": 4})]))
    std, out_std = 0.02, 0.02 / math.sqrt(16)
    assert model.tok_emb.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.blocks[0].attn.out.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.blocks[0].ffn.down.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert (model.blocks[0].attn_norm.weight == 1).all()
    # the memory layer keeps its own init: projections N(0, dim^-1/2), zero biases, values N(0, d_v^-1/2)
    layer = model.blocks[2].memory
    assert layer.readout.gate_proj.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert layer.readout.out_proj.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert layer.store.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert (layer.readout.gate_proj.bias == 0).all()
    bound = layer.addressing.key_dim**-0.5
    keys = layer.addressing.keys
    assert keys.abs().max().item() <= bound and keys.std().item() > 0.5 * bound / 3**0.5


def test_init_never_touches_memory_layers():
    """Re-running the model's init leaves every memory-layer tensor bit-identical."""
    model = Transformer(tiny(memories=[mem("1,2", pool="p")]))
    before = {k: v.clone() for k, v in model.state_dict().items() if ".memory." in k}
    model.reset_parameters()
    after = model.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(Transformer(tiny()).tok_emb.weight, model.tok_emb.weight)


def test_generate_is_greedy_and_crops():
    model = Transformer(tiny(max_seq_len=8)).train()
    idx = tokens(B=2, T=5)
    out = model.generate(idx, 6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], idx) and model.training
    model.eval()
    for t in range(5, 11):
        context = out[:, max(0, t - 8) : t]
        assert torch.equal(model(context).logits[:, -1].argmax(-1), out[:, t])
    assert torch.equal(model.generate(idx, 0), idx)


# ---------------------------------------------------------------- memory slots


def test_replace_and_beside():
    model = Transformer(tiny(memories=[mem("0"), mem("2", mode="beside")]))
    assert model.blocks[0].ffn is None and isinstance(model.blocks[0].memory, MemoryLayer)
    assert isinstance(model.blocks[2].ffn, SwiGLU) and isinstance(model.blocks[2].memory, MemoryLayer)
    assert model.blocks[1].memory is None and isinstance(model.blocks[1].ffn, SwiGLU)
    assert [i for i, _ in model.memory_layers()] == [0, 2]
    assert model.memory_layers()[1][1] is model.blocks[2].memory
    for i, parts in ((0, ("memory",)), (2, ("ffn", "memory"))):  # the block's output, by hand
        block = model.blocks[i]
        x = torch.randn(2, 5, 32)
        h = x + block.attn(block.attn_norm(x))
        n = block.ffn_norm(h)
        expected = h + sum(getattr(block, p)(n) for p in parts)
        torch.testing.assert_close(block(x)[0], expected)


def test_memory_presets_and_options_are_applied():
    model = Transformer(tiny(memories=[MemorySpec(layers="1", preset="pkm", options={"n_keys": 8, "topk": 2})]))
    c = model.blocks[1].memory.config
    assert (c.n_keys, c.topk, c.query_norm, c.heads, c.dim) == (8, 2, "batchnorm", 4, 32)


def test_pkm_memory_model_trains_in_bf16():
    model = Transformer(tiny(memories=[mem("1", preset="pkm")])).to(torch.bfloat16).train()
    bn = model.blocks[1].memory.addressing.query_norm
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(tokens(), tokens(seed=1))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert bn.running_mean.dtype == torch.bfloat16 and bn.running_mean.abs().sum() > 0


def test_bad_memory_option_types_name_the_field():
    with pytest.raises(ValueError) as e:
        tiny(memories=[mem("1", options={"n_keys": 16.5})])
    message = "memories[0].options: MemoryConfig.n_keys: must be an integer, got 16.5 (float); use e.g. 1024"
    assert str(e.value) == message


def test_shared_pool_is_one_table_counted_once():
    specs = [mem("0,2", pool="p"), mem("3", pool="p", mode="beside"), mem("1")]
    model = Transformer(tiny(memories=specs))
    layers = dict(model.memory_layers())
    table = model.pools["p"]
    assert isinstance(table, ValueTable) and all(layers[i].store is table for i in (0, 2, 3))
    assert layers[1].store is not table
    params = list(model.parameters())
    assert sum(p is table.weight for p in params) == 1
    value_keys = [k for k in model.state_dict() if k.endswith("store.weight") or k.startswith("pools.")]
    assert value_keys == ["blocks.1.memory.store.weight", "pools.p.weight"]
    # the shared table receives gradient from all three layers
    model(tokens(), tokens(seed=1)).loss.backward()
    assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0
    # two models never share a pool
    assert Transformer(tiny(memories=specs)).blocks[0].memory.store is not table


def test_checkpoints_from_before_model_owned_pools_load():
    """The first layer reading a pool used to hold it (blocks.{i}.memory.values.weight)."""
    specs = [mem("0,2", pool="p"), mem("1")]
    model = Transformer(tiny(memories=specs))
    legacy = {}
    for k, v in model.state_dict().items():
        k = k.replace("pools.p.", "blocks.0.memory.values.").replace(".store.", ".values.")
        legacy[k.replace(".addressing.", ".retrieval.").replace(".readout.", ".")] = v.clone()
    fresh = Transformer(tiny(memories=specs))
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh(tokens()).logits, model(tokens()).logits)


def test_sparse_values_pool():
    model = Transformer(tiny(memories=[mem("1,2", pool="p", options={"n_keys": 8, "topk": 4, "sparse_values": True})]))
    table = model.pools["p"]
    assert table.sparse_grad and model.blocks[1].memory.store is table and model.blocks[2].memory.store is table
    model(tokens(), tokens(seed=1)).loss.backward()
    assert table.weight.grad.is_sparse


# ---------------------------------------------------------------- MoE


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = (moe.router.weight @ x[t]).softmax(-1)
        w, e = p.topk(moe.topk)
        w = w / w.sum()
        for j in range(moe.topk):
            gate, up = (x[t] @ moe.gate_up[e[j]]).chunk(2)
            out[t] += w[j] * ((F.silu(gate) * up) @ moe.down[e[j]])
    return out


@pytest.mark.parametrize("experts, topk", [(4, 1), (4, 2), (6, 3), (3, 3)])
def test_moe_matches_naive_routing(experts, topk):
    moe = MoE(dim=8, hidden=12, experts=experts, topk=topk).double()
    moe.reset_parameters(std=0.5)
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    y, aux = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, naive_moe(moe, x.reshape(-1, 8)).reshape(2, 20, 8))
    p = (x.reshape(-1, 8) @ moe.router.weight.T).softmax(-1)
    chosen = F.one_hot(p.topk(topk).indices, experts).sum(1).double()  # (T, E)
    f = chosen.mean(0) / topk
    assert aux.item() == pytest.approx(experts * (f * p.mean(0)).sum().item())


def test_moe_empty_input():
    moe = MoE(dim=8, hidden=4, experts=4, topk=2)
    y, aux = moe(torch.zeros(0, 8))
    assert y.shape == (0, 8) and aux.item() == 0.0


def test_aux_loss_uniform_and_collapsed_router():
    cfg = tiny(moe=MoESpec(layers="1", experts=4, topk=2, hidden=8, aux_weight=0.25))
    model = Transformer(cfg)
    with torch.no_grad():
        model.blocks[1].ffn.router.weight.zero_()  # every expert probability 1/E
    assert model(tokens()).aux_loss.item() == pytest.approx(0.25 * 1.0)
    # a collapsed router: every token puts ~all its mass on expert 0 -> f_0 = 1/k, P_0 ~ 1 -> aux ~ E/k
    moe = MoE(dim=4, hidden=4, experts=4, topk=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 100.0
    _, aux = moe(torch.ones(10, 4))
    assert aux.item() == pytest.approx(4.0, rel=1e-4)
    # perfectly balanced top-1: token t goes to expert t % 4 with probability ~1 -> f = P = 1/4 -> aux = 1
    with torch.no_grad():
        moe.router.weight.copy_(100 * torch.eye(4))
    _, aux = moe(torch.eye(4).repeat(3, 1))
    assert aux.item() == pytest.approx(1.0, rel=1e-4)
    # two MoE layers add up
    two = Transformer(tiny(moe=MoESpec(layers="0,2", experts=4, topk=2, hidden=8, aux_weight=0.5)))
    for i in (0, 2):
        with torch.no_grad():
            two.blocks[i].ffn.router.weight.zero_()
    assert two(tokens()).aux_loss.item() == pytest.approx(2 * 0.5)


def test_gradient_reaches_every_parameter():
    cfg = tiny(
        moe=MoESpec(layers="0", experts=3, topk=2, hidden=8),
        memories=[mem("1", pool="p"), mem("2", pool="p", mode="beside"), mem("3", preset="pkm")],
    )
    model = Transformer(cfg).train()
    out = model(tokens(B=4, T=16), tokens(B=4, T=16, seed=1))
    (out.loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
