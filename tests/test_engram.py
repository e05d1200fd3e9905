import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, rel_err

import memlayers
from memlayers import MemoryLayer, preset
from memlayers.memory.addressing.ngram_hash import PAD_ID, HashedNGrams, canonical_id_map, is_prime, next_primes
from memlayers.memory.kinds.engram import EngramConfig  # registers the kind and its preset
from memlayers.memory.readouts.engram_gate import SQRT_EPS, EngramReadout, signed_sqrt
from memlayers.memory.stores.concat_table import ConcatTable
from memlayers.model import ModelConfig, Transformer
from memlayers.model.config import MemorySpec

pytestmark = pytest.mark.usefixtures("one_thread")


def small(**overrides):
    return MemoryLayer(preset("engram", 16, **{"hash_heads": 2, "d_ngram": 8, "table_size": 11, **overrides}))


def prime_by_division(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


# ---- the hash


def wrap64(v: int) -> int:
    return (v + 2**63) % 2**64 - 2**63


def python_ngram_ids(seqs: list[list[int]], max_n: int, hash_heads: int, table_size: int, seed: int):
    """The documented formula in plain Python ints: (rows, S, H) slot ids, and whether a product wrapped."""
    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(-(2**63), 2**63 - 1, (max_n - 1, hash_heads, max_n), dtype=torch.int64, generator=g) | 1
    mults = drawn.tolist()
    primes, p = [], table_size
    while len(primes) < (max_n - 1) * hash_heads:
        if prime_by_division(p):
            primes.append(p)
        p += 1
    out, wrapped = [], False
    for seq in seqs:
        padded = [PAD_ID] * (max_n - 1) + seq
        rows = []
        for t in range(len(seq)):
            row = []
            for n in range(2, max_n + 1):
                for j in range(hash_heads):
                    mix = 0
                    for i in range(n):  # c[t - i] * m_i
                        product = padded[max_n - 1 + t - i] * mults[n - 2][j][i]
                        wrapped |= product != wrap64(product)
                        mix ^= wrap64(product)
                    h = (n - 2) * hash_heads + j
                    row.append(sum(primes[:h]) + mix % primes[h])
            rows.append(row)
        out.append(rows)
    return out, wrapped, primes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_n,hash_heads,table_size,seed", [(2, 1, 1, 0), (3, 2, 11, 0), (4, 3, 50, 7)])
def test_hash_matches_the_documented_formula(max_n, hash_heads, table_size, seed, device):
    a = HashedNGrams(max_n, hash_heads, table_size, seed).to(device)
    tokens = torch.randint(0, 2**40, (2, 9))
    tokens[0, :3] = torch.tensor([0, 1, 2**40])  # tiny and large ids
    ids, weights = a(torch.zeros(18, 4, device=device), token_ids=tokens.to(device))
    assert ids.device == weights.device == a.multipliers.device
    expected, wrapped, primes = python_ngram_ids(tokens.tolist(), max_n, hash_heads, table_size, seed)
    H = (max_n - 1) * hash_heads
    assert wrapped, "no product overflowed int64: the wrap-around is not tested"
    assert ids.shape == weights.shape == (18, H, 1) and ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.view(2, 9, H).tolist() == expected
    assert torch.equal(weights, torch.ones_like(weights))
    assert a.primes.tolist() == primes and a.num_slots == sum(primes)
    assert a.heads == H and a.topk == 1 and a.grid is None and a.flops_per_token() == 0
    assert list(a.parameters()) == []
    assert 0 <= ids.min() and ids.max() < a.num_slots


def test_multipliers_are_odd_seeded_and_saved():
    a, b, c = HashedNGrams(3, 2, 11, seed=0), HashedNGrams(3, 2, 11, seed=0), HashedNGrams(3, 2, 11, seed=1)
    m = a.multipliers.view(2, 2, 3)
    assert torch.equal(m[0, :, 2], torch.zeros(2, dtype=torch.int64))  # bigrams mix 2 ids
    assert bool((m[0, :, :2] % 2 != 0).all()) and bool((m[1] % 2 != 0).all())
    assert torch.equal(a.multipliers, b.multipliers) and not torch.equal(a.multipliers, c.multipliers)
    assert set(a.state_dict()) == {"multipliers"}


def test_is_prime_and_next_primes():
    assert [n for n in range(3000) if is_prime(n)] == [n for n in range(3000) if prime_by_division(n)]
    assert is_prime(2**61 - 1) and is_prime(1_000_000_007)
    for composite in (561, 1105, 3215031751, 2**61 + 1, 1_000_000_007 * 998_244_353):  # Carmichael, strong pseudoprimes
        assert not is_prime(composite)
    for start, count in ((1, 5), (2, 3), (11, 8), (24, 4), (7919, 6)):
        primes = next_primes(start, count)
        assert len(set(primes)) == count and min(primes) >= start and all(prime_by_division(p) for p in primes)
        assert primes == [p for p in range(max(2, start), primes[-1] + 1) if prime_by_division(p)]  # the smallest


def test_sequence_start_is_padded_per_row():
    a = HashedNGrams(3, 2, 11)
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    ids = a(torch.zeros(8, 4), token_ids=tokens)[0].view(2, 4, 4, 1)
    for r in range(2):  # each row starts fresh: not continued from the row before it
        alone = a(torch.zeros(4, 4), token_ids=tokens[r])[0]
        assert torch.equal(ids[r], alone.view(4, 4, 1))
    padded = a(torch.zeros(6, 4), token_ids=torch.tensor([PAD_ID, PAD_ID, 5, 6, 7, 8]))[0]
    assert torch.equal(padded[2:], ids[0].view(4, 4, 1))
    moved = a(torch.zeros(4, 4), token_ids=torch.tensor([1, 6, 7, 8]))[0].view(4, 4, 1)
    assert torch.equal(moved[3:], ids[0, 3:]) and torch.equal(moved[2, :2], ids[0, 2, :2])  # n-grams past position 0
    assert not torch.equal(moved[1, :2], ids[0, 1, :2]) and not torch.equal(moved[2, 2:], ids[0, 2, 2:])  # through it


@pytest.mark.parametrize("lead", [(2, 7), (7,), (2, 1, 7)])
def test_addressing_in_pieces_equals_one_call(lead):
    a = HashedNGrams(4, 2, 13)
    tokens = torch.randint(0, 50, lead)
    full = a(torch.zeros(tokens.numel(), 4), token_ids=tokens)[0].view(*lead, a.heads)
    state, pieces, start = {}, [], 0
    for size in (1, 0, 2, 1, 3):
        part = tokens[..., start : start + size]
        pieces.append(a(torch.zeros(part.numel(), 4), token_ids=part, state=state)[0].view(*lead[:-1], size, a.heads))
        start += size
    assert torch.equal(torch.cat(pieces, -2), full)
    with pytest.raises(ValueError, match="sequences"):
        a(torch.zeros(3, 4), token_ids=torch.zeros(3, 1, dtype=torch.int64), state=state)


# ---- canonical ids


def test_canonical_id_map():
    texts = ["a", "A", " a", "b", "\uff21", "\ufffd", "\ufffd", "  ", "\t", "a b", "a \n b", "", "B "]
    got = canonical_id_map(lambda i: texts[i], len(texts)).tolist()
    assert got == [0, 0, 0, 3, 0, 5, 6, 7, 7, 9, 9, 11, 3]


def test_canonical_ids_hash_equal_tokens_alike():
    texts = ["a", "A", "b", " B", "c"]
    layer = small(canonical_ids=True, vocab_size=5)
    a = layer.addressing
    assert torch.equal(a.id_map, torch.arange(5))  # identity until set
    x = torch.zeros(3, 16)
    before = a(x, token_ids=torch.tensor([1, 3, 4]))[0]
    assert not torch.equal(before, a(x, token_ids=torch.tensor([0, 2, 4]))[0])
    a.set_canonical_ids(lambda i: texts[i])
    assert torch.equal(a(x, token_ids=torch.tensor([1, 3, 4]))[0], a(x, token_ids=torch.tensor([0, 2, 4]))[0])
    other = small(canonical_ids=True, vocab_size=5)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.addressing.id_map, torch.tensor([0, 0, 2, 2, 4]))
    with pytest.raises(ValueError, match="shape"):
        a.set_id_map(torch.arange(4))
    with pytest.raises(ValueError, match="no id_map"):
        small().addressing.set_id_map(torch.arange(5))
    padded, mask = torch.tensor([-100, 1, 3, 4]), torch.tensor([False, True, True, True])  # padding's id: no token's
    assert torch.equal(a(None, mask, padded)[0][1:], a(None, None, torch.tensor([1, 3, 4]))[0])
    with pytest.raises(ValueError, match="token ids must be in"):
        a(None, None, padded)  # unmasked, -100 is a bad id


# ---- the store


@pytest.mark.parametrize("T,H,d", [(7, 3, 5), (1, 1, 1), (0, 2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concat_table_is_one_row_per_head(T, H, d, dtype):
    store = ConcatTable(13, d, H).to(dtype)
    ids = torch.randint(0, 13, (T, H, 1))
    ids[:, 0] = ids[:, -1]  # repeated rows
    weights = torch.rand(T, H, 1)
    out = store(ids, weights)
    assert out.shape == (T, H * d) and out.dtype == dtype and store.out_dim == H * d
    ref = (weights.double()[..., None] * F.embedding(ids, store.weight.double())).reshape(T, H * d)
    if T:
        assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    ones = store(ids, torch.ones(T, H, 1))
    if T:
        assert torch.equal(ones, F.embedding(ids, store.weight).reshape(T, H * d))
    assert store.read_flops(H) == 0 and store.read_params(H) == H * d
    with pytest.raises(ValueError, match="shape"):
        store(ids.expand(T, H, 2), weights.expand(T, H, 2))


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_concat_table_gradient(sparse_grad):
    store = ConcatTable(11, 4, 3, sparse_grad=sparse_grad)
    ref_weight = store.weight.detach().clone().requires_grad_()
    ids = torch.randint(0, 11, (6, 3, 1))
    g = torch.randn(6, 12)
    (store(ids, torch.ones(6, 3, 1)) * g).sum().backward()
    (F.embedding(ids, ref_weight).reshape(6, 12) * g).sum().backward()
    assert store.weight.grad.is_sparse == sparse_grad
    assert rel_err(store.weight.grad, ref_weight.grad) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_values_train_with_sparse_adam(device):
    layer = small(sparse_values=True).to(device)
    opt = memlayers.build_optimizer(layer, 1e-3, value_optimizer="sparse_adam")
    tokens = torch.randint(0, 40, (2, 6), device=device)
    before = layer.store.weight.detach().clone()
    read = torch.zeros(layer.store.num_values, dtype=torch.bool, device=device)
    read[layer.retrieve(torch.zeros(2, 6, 16, device=device), token_ids=tokens)[0].flatten()] = True
    layer(torch.randn(2, 6, 16, device=device), token_ids=tokens).square().mean().backward()
    assert layer.store.weight.grad.is_sparse
    opt.step()
    changed = (layer.store.weight != before).any(1)
    assert torch.equal(changed, read)  # exactly the rows read move


# ---- the readout


def rms(v, gain, eps=1e-6):
    return v / (v.square().mean(-1, keepdim=True) + eps).sqrt() * gain


def test_signed_sqrt():
    z = torch.tensor([-4.0, 0.0, 9.0], requires_grad=True)
    y = signed_sqrt(z)
    assert torch.allclose(y, torch.tensor([-((4 + SQRT_EPS) ** 0.5), 0.0, (9 + SQRT_EPS) ** 0.5]))
    y.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad[1] == 0


def test_readout_matches_a_hand_written_reference():
    dim, in_dim, K, dil, B, S = 4, 6, 3, 2, 2, 5
    r = EngramReadout(dim, in_dim, True, K, dil).double()
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn_like(p))  # gains and biases too
    e, x = torch.randn(B * S, in_dim, dtype=torch.float64), torch.randn(B * S, dim, dtype=torch.float64)
    out = r(e, x, (B, S))
    k = rms(e @ r.key_proj.weight.T + r.key_proj.bias, r.key_norm.weight)
    q = rms(x, r.query_norm.weight)
    z = (k * q).sum(-1) / math.sqrt(dim)
    g = torch.sigmoid(torch.sign(z) * (z.abs() + SQRT_EPS).sqrt())
    v = g[:, None] * (e @ r.value_proj.weight.T + r.value_proj.bias)
    u = rms(v, r.conv_norm.weight).view(B, S, dim)
    w = r.conv.weight[:, 0]  # (dim, K)
    conv = torch.zeros(B, S, dim, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            for j in range(K):  # tap j reads position t - (K - 1 - j) * dil, zero before the start
                src = t - (K - 1 - j) * dil
                if src >= 0:
                    conv[b, t] += w[:, j] * u[b, src]
    expected = v + F.silu(conv).view(B * S, dim)
    assert rel_err(out, expected) < 1e-12
    plain = EngramReadout(dim, in_dim, short_conv=False).double()
    plain.load_state_dict({k: t for k, t in r.state_dict().items() if not k.startswith("conv")})
    assert rel_err(plain(e, x, (B, S)), v) < 1e-12


def test_layer_in_pieces_equals_one_call():
    layer = small(hash_heads=3, d_ngram=6, table_size=17).eval()
    tokens, x = torch.randint(0, 40, (2, 9)), torch.randn(2, 9, 16)
    full = layer(x, token_ids=tokens)
    state, pieces, start = {}, [], 0
    for size in (2, 1, 0, 1, 4, 1):
        part = slice(start, start + size)
        pieces.append(layer(x[:, part], token_ids=tokens[:, part], state=state))
        start += size
    assert set(state) == {"ngram_history", "conv_history"}
    assert rel_err(torch.cat(pieces, 1), full) < 1e-5


def test_padding_is_the_outside_of_the_sequence():
    """A left-padded row's real tokens get what they get unpadded (n-gram rows and the conv alike), whatever the
    pad ids; in pieces with a decoding state too."""
    layer = small(hash_heads=3, d_ngram=6, table_size=17).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    tokens, x = torch.randint(0, 40, (2, 9)), torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    out = layer(x, mask=mask, token_ids=tokens)
    alone = layer(x[1:, 4:], token_ids=tokens[1:, 4:])
    assert rel_err(out[1, 4:], alone[0]) < 1e-5 and rel_err(out[0], layer(x[:1], token_ids=tokens[:1])[0]) < 1e-5
    unmasked = layer(x, token_ids=tokens)  # without the mask the pads are tokens: the first real ones differ
    assert rel_err(unmasked[1, 4:6], alone[0, :2]) > 1e-2
    garbage = x.clone()
    garbage[1, :4] = float("nan")  # whatever the padding's hidden states hold stays out of the real tokens
    assert rel_err(layer(garbage, mask=mask, token_ids=tokens)[1, 4:], alone[0]) < 1e-5
    state, pieces = {}, []
    for part in (slice(0, 5), slice(5, 6), slice(6, 9)):
        pieces.append(layer(x[:, part], mask=mask[:, part], token_ids=tokens[:, part], state=state))
    assert rel_err(torch.cat(pieces, 1), out) < 1e-5
    a = layer.addressing
    ids = a(None, mask.reshape(-1), tokens)[0].view(2, 9, -1)
    padded = tokens.clone()
    padded[1, :4] = PAD_ID
    assert torch.equal(ids, a(None, None, padded)[0].view(2, 9, -1))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_close_to_fp32(device):
    layer = small().to(device)
    x, tokens = torch.randn(2, 7, 16, device=device), torch.randint(0, 40, (2, 7), device=device)
    ref = layer(x, token_ids=tokens)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert rel_err(layer(x, token_ids=tokens), ref) < 1e-2
    half = copy.deepcopy(layer).to(torch.bfloat16)
    out = half(x.bfloat16(), token_ids=tokens)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


def test_gradients_reach_every_part():
    layer = small()
    layer(torch.randn(2, 6, 16), token_ids=torch.randint(0, 40, (2, 6))).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n for n, _ in layer.named_parameters()} >= {
        "store.weight",
        "readout.key_proj.weight",
        "readout.value_proj.weight",
        "readout.conv.weight",
    }


@pytest.mark.parametrize("lead", [(0, 5), (2, 0), (0,), (), (5,)])
def test_any_leading_shape_and_empty_batches(lead):
    layer = small()
    x = torch.randn(*lead, 16, requires_grad=True)
    y = layer(x, token_ids=torch.randint(0, 40, lead))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_flops_and_reads():
    layer = small()
    a, s, r = layer.parts()
    assert a.flops_per_token() == 0 and s.read_flops(a.heads) == 0
    expected = 2 * (2 * 16 * 16) + 2 * 16 + 2 * 4 * 16  # W_k, W_v (in 2*8 -> 16), gate dot, conv
    assert r.flops_per_token() == layer.flops_per_token() == expected
    assert small(short_conv=False).flops_per_token() == expected - 2 * 4 * 16
    assert layer.reads_per_token() == 4 * 4  # 4 heads x rows of 8 / 2


def test_training_forward_updates_usage():
    layer = small().train()
    layer(torch.randn(3, 4, 16), token_ids=torch.randint(0, 40, (3, 4)))
    assert layer.usage.summary()["tokens_seen"] == 12


# ---- errors


def test_missing_token_ids_is_a_clear_error():
    with pytest.raises(ValueError, match="token_ids"):
        small()(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="token_ids"):
        HashedNGrams(3, 2, 11)(torch.randn(2, 16))


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"max_n": 1}, "max_n"),
        ({"hash_heads": 0}, "hash_heads"),
        ({"d_ngram": 10, "hash_heads": 4}, "d_ngram"),
        ({"table_size": 0}, "table_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"seed": -1}, "seed"),
        ({"conv_kernel": 0}, "conv_kernel"),
        ({"max_n": 2.5}, "max_n"),
    ],
)
def test_bad_config_fields(overrides, field):
    with pytest.raises(ValueError, match=f"EngramConfig.{field}:") as info:
        preset("engram", 16, **overrides)
    assert "\n" not in str(info.value)


def test_sizes_needed_to_build():
    with pytest.raises(ValueError, match="EngramConfig.table_size: is None"):
        MemoryLayer(preset("engram", 16))
    with pytest.raises(ValueError, match="EngramConfig.vocab_size: is None"):
        MemoryLayer(preset("engram", 16, table_size=11, canonical_ids=True))
    c = preset("engram", 16).in_model(2, 40)
    assert c.table_size == 200 and c.vocab_size == 40 and c.d_ngram == 16
    assert preset("engram", 16, table_size=7).in_model(2, 40).table_size == 7
    with pytest.raises(ValueError, match="EngramConfig.vocab_size"):
        preset("engram", 16, vocab_size=30).in_model(2, 40)
    layer = MemoryLayer(c)
    assert layer.store.num_values == c.num_slots == sum(next_primes(200, 16))
    assert layer.store.signature() == c.pool_signature()


# ---- in the Transformer


def engram_model(**spec):
    options = {"hash_heads": 2, "d_ngram": 8, "table_size": 11}
    memories = [MemorySpec(**{"layers": "0", "preset": "engram", "mode": "beside", "options": options, **spec})]
    return Transformer(ModelConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, max_seq_len=16, memories=memories))


def test_transformer_trains_and_decodes_with_a_cache():
    model = engram_model()
    idx = torch.randint(0, 40, (2, 10))
    out = model(idx, idx)
    out.loss.backward()
    memory = model.blocks[0].memory
    assert isinstance(memory.config, EngramConfig) and memory.config.vocab_size == 40
    assert memory.store.weight.grad.abs().sum() > 0 and memory.readout.conv.weight.grad.abs().sum() > 0
    for prompt in (idx[:, :4], idx):  # 10 + 5 > max_seq_len: the cache restarts on the cropped context
        cached = model.generate(prompt, 5, use_cache=True)
        assert torch.equal(cached, model.generate(prompt, 5, use_cache=False))
        assert cached.shape == (2, prompt.shape[1] + 5)


def test_transformer_layers_share_a_pool():
    model = engram_model(layers="0,1", pool="ngrams")
    first, second = (b.memory for b in model.blocks)
    assert first.store is second.store is model.pools["ngrams"]
    model(torch.randint(0, 40, (2, 5))).logits.sum().backward()
    assert model.pools["ngrams"].weight.grad is not None
