"""Serving memories. 8-bit value tables: the quantised read against a full-precision read of the dequantised table,
the quantisation error bound. Offloaded tables (host memory, memory-mapped files): reads exactly those of the table
in place. Both: whole models (shared pools, generation, state dicts) and bad input."""

import copy
import os

import pytest
import torch

from memlayers import build_optimizer
from memlayers.memory.parts import ValueStore
from memlayers.memory.stores.value_table import ValueTable
from memlayers.model import Transformer
from memlayers.model.config import MemorySpec, ModelConfig
from memlayers.optim import value_stores
from memlayers.serving import offload_values, quantize_values

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
    dequantised = table.qweight.float() * table.weight_scale[:, None]  # (N, d)
    out = torch.full((T, 24), float("nan"))
    out[:] = table.bag(ids, weights)
    expected = torch.einsum("tl,tld->td", weights, dequantised[ids])
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6) and not out.isnan().any()
    error = (dequantised - original).abs()
    assert (error <= BOUND[fmt] * original.abs().amax(1, keepdim=True) + 1e-7).all()
    assert table.qweight.element_size() == 1 and table.weight_scale.dtype == torch.float32
    assert table.param_roles() == {"values": []} and "weight" not in dict(table.named_parameters())
    assert "quantized=" + fmt in repr(table)


class Unservable(ValueStore):
    """A store of a kind memlayers.serving does not know (like one sharded over processes)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(4, 2))

    def param_roles(self):
        return {"values": [self.table]}


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
            ref.weight.copy_(store.qweight.float() * store.weight_scale[:, None])
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
    unservable = Unservable()
    with pytest.raises(ValueError, match="Unservable cannot .*nothing was changed"):
        quantize_values(unservable)
    with pytest.raises(ValueError, match="Unservable cannot .*nothing was changed"):
        offload_values(unservable)
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


@pytest.mark.parametrize("fmt", [None, "int8"])
@pytest.mark.parametrize("where", ["host", "disk"])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_an_offloaded_read_is_the_read_in_place(where, fmt, T, tmp_path):
    torch.manual_seed(0)
    table = ValueTable(101, 24)
    if fmt:
        table.quantize_(fmt)
    ids, weights = torch.randint(0, 101, (T, 9)), torch.randn(T, 9)
    ids[:, :3] = 7  # rows read twice and by several tokens
    expected = table.bag(ids, weights)
    values = {k: v.clone() for k, v in table.state_dict().items()}
    table.offload_(where, str(tmp_path / "t.") if where == "disk" else None)
    out = torch.full_like(expected, float("nan"))
    out[:] = table.bag(ids, weights)
    assert torch.equal(out, expected)
    assert not list(table.parameters()) and not list(table.buffers())  # nothing .to() would move
    assert table.param_roles() == {"values": []} and f"offloaded={where}" in repr(table)
    state = table.state_dict()
    assert state.keys() == values.keys() and all(torch.equal(state[k], values[k]) for k in values)
    if where == "disk":
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"t.{k}.bin" for k in values)


def test_a_model_serves_offloaded_tables_and_keeps_its_state_dict(tmp_path):
    m, fresh = model().eval(), model().eval()
    x = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        before, generated = m(x).logits, m.generate(x[:, :4], 5)
    quantize_values(m, "int8")
    with torch.no_grad():
        quantized = m(x).logits
    shapes = [tuple(s.qweight.shape) for s in (m.pools["values"], m.blocks[1].memory.store)]
    summary = offload_values(m, "disk", str(tmp_path / "tables"))
    assert summary["tables"] == 2 and summary["bytes"] == sum(n * (d + 4) for n, d in shapes)
    assert sorted(os.path.basename(f) for f in summary["files"]) == [
        "blocks.1.memory.store.qweight.bin", "blocks.1.memory.store.weight_scale.bin",
        "pools.values.qweight.bin", "pools.values.weight_scale.bin"]  # fmt: skip
    with torch.no_grad():
        assert torch.equal(m(x).logits, quantized)
    state = m.state_dict()
    assert "pools.values.qweight" in state and "pools.values.weight_scale" in state
    # a load writes through to the files: here the in-place float32 model's tables, offloaded to host memory
    offload_values(fresh, "host")
    fresh.load_state_dict({k: v for k, v in model().state_dict().items()})
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, before)
        assert torch.equal(fresh.generate(x[:, :4], 5), generated)
    scale = m.pools["values"].host["weight_scale"]
    doubled = 2 * scale
    m.load_state_dict({**state, "pools.values.weight_scale": doubled})
    on_disk = torch.from_file(summary["files"][-1], shared=False, size=scale.numel(), dtype=torch.float32)
    assert [os.path.basename(f) for f in summary["files"]][-1] == "pools.values.weight_scale.bin"
    assert torch.equal(scale, doubled) and torch.equal(on_disk, doubled)
    with pytest.raises(RuntimeError, match="Missing key.*pools.values.weight"):
        fresh.load_state_dict({k: v for k, v in fresh.state_dict().items() if k != "pools.values.weight"})
    with pytest.raises(ValueError, match="no value tables left in place"):
        offload_values(m, "host")
    with pytest.raises(ValueError, match="left to quantise"):
        quantize_values(fresh, "int8")


def test_offload_bad_input(tmp_path):
    with pytest.raises(ValueError, match="where must be one of"):
        offload_values(model(), "gpu")
    with pytest.raises(ValueError, match="give a directory"):
        offload_values(model(), "disk")
    with pytest.raises(ValueError, match="give a directory"):
        offload_values(model(), "host", str(tmp_path))
    m = model()
    (tmp_path / "pools.values.weight.bin").write_text("mine")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(FileExistsError, match="pools.values.weight.bin exists"):
        offload_values(m, "disk", str(tmp_path))
    assert (tmp_path / "pools.values.weight.bin").read_text() == "mine"  # a user's file is never touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pools.values.weight.bin"]
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())  # nothing changed
    table = ValueTable(8, 4)
    table.offload_("host")
    with pytest.raises(ValueError, match="already offloaded"):
        table.offload_("host")
    with pytest.raises(ValueError, match="before offloading"):
        table.quantize_("int8")


def test_a_full_disk_is_one_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    m = model()
    with pytest.raises(OSError, match=r"cannot write .*\.weight\.bin \(26,016 bytes\): No space left on device; free"):
        offload_values(m, "disk", str(tmp_path))
    assert not list(tmp_path.iterdir())  # no file, no temporary file
    assert all(s.offloaded is None and "weight" in dict(s.named_parameters()) for s in value_stores(m))


def test_an_8_bit_state_dict_saved_with_the_scale_named_scale_loads():
    table = ValueTable(10, 4)
    table.quantize_("int8")
    state = {k: v.clone() for k, v in table.state_dict().items()}
    fresh = ValueTable(10, 4)
    fresh.quantize_("int8")
    fresh.load_state_dict({"qweight": state["qweight"], "scale": state["weight_scale"]})
    assert torch.equal(fresh.weight_scale, state["weight_scale"]) and torch.equal(fresh.qweight, state["qweight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", [None, "int8"])
def test_offloaded_tables_serve_a_model_on_the_gpu(fmt):
    """Pinned copies and the n-gram prefetch on a side stream: the pool, engram's table (8-bit too)."""
    m = model().eval()
    if fmt:
        quantize_values(m, fmt)
    x = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        expected = m.cuda()(x.cuda()).logits
        offload_values(m.cpu(), "host")
        m.cuda()
        assert all(t.device.type == "cpu" for t in m.pools["values"].host.values())
        assert torch.allclose(m(x.cuda()).logits, expected, rtol=1e-5, atol=1e-6)


def test_hashed_n_gram_rows_are_prefetched_before_the_layer_reads_them(monkeypatch):
    from memlayers.memory.stores import servable

    torch.manual_seed(0)
    memories = [MemorySpec(layers="1", preset="engram", options={"table_size": 64})]
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, max_seq_len=16, memories=memories)).eval()
    x = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        expected, generated = m(x).logits, m.generate(x[:, :4], 6)
    offload_values(m, "host")
    fetches = []
    fetch = servable.fetch_rows
    monkeypatch.setattr(servable, "fetch_rows", lambda table, rows: fetches.append(rows) or fetch(table, rows))
    layer, store = m.blocks[1].memory, m.blocks[1].memory.store
    with torch.no_grad():
        ids, _ = layer.prefetch(x)
        assert len(fetches) == 1 and len(store.prefetched) == 1  # fetched before block 0 runs
        assert torch.equal(store.prefetched[0][0], torch.unique(ids))
        store.prefetched = ()
        fetches.clear()
        assert torch.equal(m(x).logits, expected) and len(fetches) == 1  # once per forward: in the prefetch
        assert store.prefetched == ()  # taken by the read
        assert torch.equal(m.generate(x[:, :4], 6), generated)  # the n-gram history advances once per step
        layer.prefetch(x)
        m.load_state_dict(m.state_dict())
        assert store.prefetched == ()  # rows fetched before a load are not read after it


def test_the_offload_benchmark_decodes_the_same_tokens_wherever_the_values_are(monkeypatch):
    import argparse
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    bench = importlib.import_module("offloaded_values")
    args = argparse.Namespace(n_keys=32, dim=16, batches=[1, 2], new_tokens=2, repeats=1, device="cpu")
    rows = {where: bench.measure(args, "int8", where) for where in ("in place", "disk")}
    assert rows["disk"]["tokens"] == rows["in place"]["tokens"] and len(rows["disk"]["tokens"]) == 2
    assert all(r["tok/s@2"] > 0 and set(r["rss"]) == {"anon", "file"} for r in rows.values())


KINDS = {
    "peer": {"n_keys": 8, "topk": 4},
    "ultramem": {"n_keys": 8, "topk": 4},
    "ultramem_v2": {"n_keys": 8, "topk": 4},
    "memory": {"n_keys": 8, "topk": 4},
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_serves_8_bit_and_offloaded(kind, tmp_path):
    """The 8-bit model is the model holding the dequantised tables; offloaded, it reads exactly the same."""

    torch.manual_seed(0)
    memories = [MemorySpec(layers="1", preset=kind, options=KINDS[kind])]
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, max_seq_len=16, memories=memories)).eval()
    reference, in_place = copy.deepcopy(m), copy.deepcopy(m)
    x = torch.randint(0, 50, (3, 12))
    offload_values(in_place, "host")
    with torch.no_grad():
        assert torch.equal(in_place(x).logits, m(x).logits)
    quantize_values(m, "int8")
    (store,), (ref,) = ([s for s in value_stores(model) if s.root() is s] for model in (m, reference))
    assert len(store.served_tables) == (2 if kind in ("peer", "ultramem_v2") else 1)  # v2's store is PEER's
    with torch.no_grad():
        for name in store.served_tables:
            getattr(ref, name).copy_(getattr(store, f"q{name}").float() * getattr(store, f"{name}_scale")[:, None])
        quantized = m(x).logits
        assert torch.allclose(quantized, reference(x).logits, rtol=1e-5, atol=1e-5)
        offload_values(m, "disk", str(tmp_path))
        assert torch.equal(m(x).logits, quantized)
        assert m.generate(x[:, :4], 3).shape == (3, 7)
