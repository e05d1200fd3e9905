"""Parameter and FLOP accounting (memlayers.accounting) against counts done by hand from the configs."""

import pytest
import torch

from memlayers import MemoryLayer, preset
from memlayers.accounting import Accounting, account, memory_flops
from memlayers.model import MemorySpec, ModelConfig, MoESpec, Transformer

# The tiny model all hand counts start from: V = 50, dim = 16, 2 layers, SwiGLU hidden 48
# (8/3 * 16 = 42.7 -> 42 -> rounded up to a multiple of 16), tied embeddings, seq_len 8.
BASE = {"vocab_size": 50, "dim": 16, "n_layers": 2, "n_heads": 2, "multiple_of": 16}
SEQ = 8
EMB = 50 * 16  # 800, also the tied lm head
ATTN = 4 * 16 * 16  # qkv (48 x 16) + out (16 x 16) = 1024
FFN = 3 * 16 * 48  # gate, up, down = 2304
NORMS = 2 * 16  # two RMSNorm gains per block
ATTN_FLOPS = 2 * ATTN + 2 * 2 * 16 * (SEQ + 1) // 2  # projections 2048 + scores and values 2*2*dim*(T+1)/2 = 288
FFN_FLOPS = 2 * FFN  # 4608
LM_FLOPS = 2 * EMB  # 1600


def test_dense_by_hand():
    acc = account(Transformer(ModelConfig(**BASE)), SEQ)
    assert isinstance(acc, Accounting) and acc.seq_len == SEQ
    assert ATTN_FLOPS == 2048 + 288
    total = EMB + 2 * (ATTN + FFN + NORMS) + 16  # + final norm = 800 + 6720 + 16
    assert total == 7536 and acc.total_params == total
    assert acc.embedding_params == 800 and acc.memory_params == 0
    assert acc.active_params == total
    assert acc.flops_per_token == 2 * (ATTN_FLOPS + FFN_FLOPS) + LM_FLOPS == 15488
    expected = {"attention_proj": 2 * 2048, "attention_scores": 2 * 288, "ffn": 2 * 4608, "moe": 0, "memory": 0}
    assert acc.breakdown == {**expected, "lm_head": 1600}
    assert sum(acc.breakdown.values()) == acc.flops_per_token
    assert acc.to_dict()["flops_per_token"] == 15488


def test_untied_lm_head_is_an_ordinary_parameter():
    tied = account(Transformer(ModelConfig(**BASE)), SEQ)
    untied = account(Transformer(ModelConfig(**BASE, tie_embeddings=False)), SEQ)
    assert untied.total_params == tied.total_params + 800 == untied.active_params
    assert untied.embedding_params == 800 and untied.flops_per_token == tied.flops_per_token


def test_attention_flops_grow_with_the_context():
    model = Transformer(ModelConfig(**BASE))
    a, b = account(model, 8), account(model, 9)
    assert b.flops_per_token - a.flops_per_token == 2 * (2 * 16)  # one more position: 2 layers x 2*dim
    with pytest.raises(ValueError, match="seq_len"):
        account(model, 0)


def test_moe_by_hand():
    # block 1: router (4 x 16) + 4 experts of hidden 8 (3*16*8 = 384 each), top-2
    cfg = ModelConfig(**BASE, moe=MoESpec(layers="1", experts=4, topk=2, hidden=8))
    acc = account(Transformer(cfg), SEQ)
    expert = 3 * 16 * 8
    total = EMB + 2 * (ATTN + NORMS) + FFN + (4 * 16 + 4 * expert) + 16
    assert total == 800 + 2 * 1056 + 2304 + 64 + 1536 + 16 and acc.total_params == total
    assert acc.active_params == total - 2 * expert < acc.total_params  # 2 of the 4 experts idle per token
    moe_flops = 2 * 4 * 16 + 2 * (2 * expert)  # router + 2 experts
    assert acc.breakdown["moe"] == moe_flops == 1664
    assert acc.flops_per_token == 2 * ATTN_FLOPS + FFN_FLOPS + moe_flops + LM_FLOPS


def memory_plus_by_hand(dim=16, n=8, heads=2, k=4, key_dim=8, value_dim=16) -> tuple[int, int, int]:
    """(parameters of a Memory+ layer without its values, value entries, forward FLOPs per token)."""
    params = dim * heads * key_dim + heads * key_dim  # query projection + bias
    params += heads * 2 * n * key_dim // 2  # sub-keys: per head, two halves of n keys of key_dim/2
    params += 2 * (dim * value_dim + dim)  # gate (W1) and out (W2) projections with biases (value_dim = dim)
    flops = 2 * dim * heads * key_dim  # query projection
    flops += 2 * heads * n * key_dim  # scores of all 2n sub-keys (key_dim/2 wide)
    flops += heads * 2 * n  # top-k of each half: one comparison per score
    candidates = {4: 8}[k]  # grid cells with (a+1)(b+1) <= 4: (0, 0..3), (1, 0..1), (2, 0), (3, 0)
    flops += 2 * heads * candidates  # their adds + the final top-k comparisons
    flops += 3 * heads * k  # softmax over k
    flops += 2 * heads * k * value_dim  # the bag of heads*k rows
    flops += 2 * 2 * dim * value_dim  # W1 and W2
    return params, n * n * value_dim, flops


def test_memory_by_hand():
    # Memory+ (n_keys 8, 2 heads, top-4, key_dim 8, value_dim 16) replacing block 1's FFN
    spec = MemorySpec(layers="1", preset="memory_plus", options={"n_keys": 8, "heads": 2, "topk": 4})
    model = Transformer(ModelConfig(**BASE, memories=[spec]))
    acc = account(model, SEQ)
    params, values, flops = memory_plus_by_hand()
    assert (params, values, flops) == (272 + 128 + 544, 1024, 512 + 256 + 32 + 32 + 24 + 256 + 1024)
    assert memory_flops(model.blocks[1].memory) == flops == acc.breakdown["memory"]
    total = EMB + 2 * (ATTN + NORMS) + FFN + params + values + 16
    assert acc.total_params == total and acc.memory_params == values == 1024
    read = 2 * 4 * 16  # heads * k rows of value_dim
    assert acc.active_params == total - values + read < acc.total_params
    assert acc.flops_per_token == 2 * ATTN_FLOPS + FFN_FLOPS + flops + LM_FLOPS


def test_shared_pool_counted_once_and_beside():
    opts = {"n_keys": 8, "heads": 2, "topk": 4}
    specs = [
        MemorySpec(layers="0", pool="p", options=opts),
        MemorySpec(layers="1", pool="p", mode="beside", options=opts),
    ]
    acc = account(Transformer(ModelConfig(**BASE, memories=specs)), SEQ)
    params, values, flops = memory_plus_by_hand()
    total = EMB + 2 * (ATTN + NORMS) + FFN + 2 * params + values + 16  # block 1 keeps its FFN; one table
    assert acc.total_params == total and acc.memory_params == values
    assert acc.active_params == total - values + 2 * (2 * 4 * 16)  # each layer reads its own heads*k rows
    assert acc.breakdown["memory"] == 2 * flops and acc.breakdown["ffn"] == FFN_FLOPS


def test_value_reads_are_not_dense_flops():
    """Quadrupling the table (n_keys 8 -> 16) adds only the extra sub-key scores and comparisons."""
    accs = []
    for n in (8, 16):
        spec = MemorySpec(layers="1", options={"n_keys": n, "heads": 2, "topk": 4})
        accs.append(account(Transformer(ModelConfig(**BASE, memories=[spec])), SEQ))
    small, big = accs
    assert big.memory_params == 4 * small.memory_params == 16 * 16 * 16
    assert big.flops_per_token - small.flops_per_token == 2 * 2 * 8 * 8 + 2 * 2 * 8  # scores + comparisons
    assert big.active_params - small.active_params == 2 * 2 * 8 * 8 // 2  # only the extra sub-keys
    assert big.breakdown["memory"] < 2 * big.memory_params / 1.5  # far less than a dense read of the table


def test_memory_flops_variants_by_hand():
    # plain "memory" preset: no gate; value_dim 8 != dim 16 -> an out projection; relu scores; 3 heads, n 10, k 5
    layer = MemoryLayer(preset("memory", 16, n_keys=10, heads=3, topk=5, value_dim=8, score_fn="relu"))
    assert layer.readout.gate_proj is None and layer.readout.out_proj is not None
    # top-5 grid: 5 + 2 + 1 + 1 + 1 = 10 cells with (a+1)(b+1) <= 5, each one add and one comparison
    expected = 2 * 16 * 3 * 8 + 2 * 3 * 10 * 8 + 3 * 2 * 10 + 2 * 3 * 10 + 3 * 5 + 2 * 3 * 5 * 8 + 2 * 8 * 16
    assert memory_flops(layer) == expected == 768 + 480 + 60 + 60 + 15 + 240 + 256
    # identity scores, value_dim == dim: no projections at all
    bare = MemoryLayer(preset("memory", 16, n_keys=10, heads=3, topk=5, score_fn="identity"))
    assert bare.readout.out_proj is None
    assert memory_flops(bare) == 768 + 480 + 60 + 60 + 2 * 3 * 5 * 16


def test_demo_reexports_memory_flops():
    import memlayers.demo

    assert memlayers.demo.memory_flops is memory_flops


def test_active_below_total_for_sparse_models():
    cfg = {"vocab_size": 100, "dim": 32, "n_layers": 4, "n_heads": 2}
    dense = account(Transformer(ModelConfig(**cfg)), 16)
    moe = account(Transformer(ModelConfig(**cfg, moe=MoESpec(layers="1,3", experts=8, topk=2))), 16)
    memory = account(Transformer(ModelConfig(**cfg, memories=[MemorySpec(layers="2", options={"n_keys": 32})])), 16)
    assert dense.active_params == dense.total_params
    assert moe.active_params < moe.total_params and memory.active_params < memory.total_params
    assert moe.total_params > dense.total_params and memory.total_params > dense.total_params
    torch.manual_seed(0)  # accounting is a pure function of the structure, not the weights
    assert account(Transformer(ModelConfig(**cfg)), 16) == dense
