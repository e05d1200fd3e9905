"""8-bit value tables for serving: the quantised read against a full-precision read of the dequantised table,
the quantisation error bound, whole models (shared pools, generation) and bad input."""

import copy

import pytest
import torch

from memlayers import build_optimizer
from memlayers.memory.stores.value_table import ValueTable
from memlayers.model import Transformer
from memlayers.model.config import MemorySpec, ModelConfig
from memlayers.serving import quantize_values

# the largest relative error of one element: int8 rounds to half a step of absmax/127; e4m3 keeps 3 mantissa bits
BOUND = {"int8": 0.5 / 127, "fp8": 2.0**-4}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_the_quantised_read_is_the_bag_of_the_dequantised_rows(fmt, T):
    torch.manual_seed(0)
    table = ValueTable(101, 24)
    original = table.weight.detach().clone()
    original[5] = 0.0  # an all-zero row: scale 0, no division by zero
    table.weight.data.copy_(original)
    ids, weights = torch.randint(0, 101, (T, 9)), torch.randn(T, 9)
    ids[:, :2] = 5
    table.quantize_(fmt)
    dequantised = table.qweight.float() * table.scale[:, None]  # (N, d)
    out = torch.full((T, 24), float("nan"))
    out[:] = table.bag(ids, weights)
    expected = torch.einsum("tl,tld->td", weights, dequantised[ids])
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6) and not out.isnan().any()
    error = (dequantised - original).abs()
    assert (error <= BOUND[fmt] * original.abs().amax(1, keepdim=True) + 1e-7).all()
    assert table.qweight.element_size() == 1 and table.scale.dtype == torch.float32
    assert table.param_roles() == {"values": []} and "weight" not in dict(table.named_parameters())
    assert "quantized=" + fmt in repr(table)


def model() -> Transformer:
    torch.manual_seed(0)
    memories = [
        MemorySpec(layers="0,2", preset="memory_plus", pool="values", options={"n_keys": 16, "topk": 4}),
        MemorySpec(layers="1", preset="engram", options={"table_size": 64}),
    ]
    return Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=2, max_seq_len=16, memories=memories))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_a_model_serves_from_8_bit_tables(fmt):
    m = model().eval()
    reference = copy.deepcopy(m)  # will hold the dequantised values in float32
    x = torch.randint(0, 50, (3, 12))
    shapes = [tuple(s.weight.shape) for s in (m.pools["values"], m.blocks[1].memory.store)]
    summary = quantize_values(m, fmt)
    with torch.no_grad():
        for store, ref in ((m.pools["values"], reference.pools["values"]),
                           (m.blocks[1].memory.store, reference.blocks[1].memory.store)):  # fmt: skip
            ref.weight.copy_(store.qweight.float() * store.scale[:, None])
        before = reference(x).logits
    assert summary["tables"] == 2  # the pool once, engram's table
    assert summary["bytes_before"] == sum(4 * n * d for n, d in shapes)  # float32
    assert summary["bytes_after"] == sum(n * (d + 4) for n, d in shapes)  # a byte per value, a float32 scale per row
    with torch.no_grad():
        after = m(x).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)  # exactly the model with the dequantised values
    assert m.generate(x[:, :4], 5).shape == (3, 9)
    optimizer = build_optimizer(m.train(), lr=1e-3)  # the rest still trains, without value groups
    assert all(g["name"] != "values" for g in optimizer.param_groups)
    m(x, x).loss.backward()
    optimizer.step()
    with pytest.raises(ValueError, match="no value tables left"):
        quantize_values(m, fmt)


def test_bad_input():
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize_values(model(), "int4")
    peer = Transformer(
        ModelConfig(
            vocab_size=50,
            dim=32,
            n_layers=2,
            n_heads=2,
            memories=[MemorySpec(layers="1", preset="peer", options={"n_keys": 8, "topk": 4})],
        )  # fmt: skip
    )
    state = {k: v.clone() for k, v in peer.state_dict().items()}
    with pytest.raises(ValueError, match="PEERExperts cannot keep its values in 8 bits yet"):
        quantize_values(peer)
    assert all(torch.equal(v, state[k]) for k, v in peer.state_dict().items())  # nothing changed
    table = ValueTable(8, 4)
    table.quantize_("int8")
    with pytest.raises(ValueError, match="already int8"):
        table.quantize_("fp8")


def test_the_benchmark_measures_every_format(tmp_path):
    """``benchmarks/quantized_values.py`` on a tiny trained run: one row per format, the 8-bit ones ~4x smaller."""
    import subprocess
    import sys
    from pathlib import Path

    from memlayers.train import load_config, train

    overrides = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "data.facts.people=8",
                 "data.facts.choices=4", "data.facts.formats=records", "train.steps=2", "train.batch_size=2",
                 "train.seq_len=16", "train.eval_every=0", "train.progress=false",
                 "model.memories=[{layers: '1', preset: memory, options: {n_keys: 8, topk: 4}}]"]  # fmt: skip
    train(load_config(None, overrides), tmp_path / "memory", evaluate=False)
    script = Path(__file__).parent.parent / "benchmarks" / "quantized_values.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path), "--arms", "memory", "--batches", "1,2",
                          "--new-tokens", "2", "--repeats", "1"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = [line.split(" | ") for line in out.strip().splitlines()[-3:]]
    assert [r[1] for r in rows] == ["float32", "int8", "fp8"]
    size = {r[1]: float(r[4].split()[0]) for r in rows}
    assert size["int8"] == size["fp8"] < 0.4 * size["float32"]
