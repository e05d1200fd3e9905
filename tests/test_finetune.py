"""Sparse memory finetuning: slot counts, background document frequencies, TF-IDF row selection, exact
row-sparse updates with everything else frozen."""

import math

import pytest
import torch

from memlayers.finetune import Background, SlotCounter, SparseMemoryFinetuning, record_background
from memlayers.model import Transformer
from memlayers.model.config import MemorySpec, ModelConfig

V, T = 50, 12


def model_with(**spec) -> Transformer:
    torch.manual_seed(0)
    options = {"n_keys": 8, "heads": 2, "topk": 3, **spec.pop("options", {})}
    memory = MemorySpec(**{"layers": "1", "preset": "memory_plus", **spec, "options": options})
    return Transformer(ModelConfig(vocab_size=V, dim=32, n_layers=3, n_heads=2, max_seq_len=T, memories=[memory]))


def batch(seed: int, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, T), generator=g), torch.randint(0, V, (b, T), generator=g)


def read_rows(model, x) -> dict[str, torch.Tensor]:
    """Brute force: {store name: (rows,) counts} of the rows every memory layer reads for x (hooks on the layers'
    inputs, then the layer's own retrieve and the store's id -> row map)."""
    names = {id(m): n for n, m in model.named_modules()}
    seen = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach())))
        for _, m in model.memory_layers()
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    counts = {}
    for layer, h in seen:
        store = layer.store.root()
        rows = layer.store.rows(layer.retrieve(h)[0]).reshape(-1)
        n = store.param_roles()["values"][0].shape[0]
        counts[names[id(store)]] = counts.get(names[id(store)], torch.zeros(n, dtype=torch.int64)) + torch.bincount(
            rows, minlength=n
        )
    return counts


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"layers": "0,2", "pool": "shared"},  # one pool read by two layers: their reads add up
        {"layers": "0,1,2", "pool": "ring", "share": "ring:0.5"},  # windows of a ring: rows are offset ids
        {"layers": "1", "preset": "ultramem", "options": {"n_keys": 8, "topk": 3}},  # virtual slots -> rows
        {"layers": "1", "preset": "peer", "options": {"n_keys": 8, "heads": 2, "topk": 3}},
    ],
)
def test_slot_counter_counts_the_rows_read(spec):
    model = model_with(**spec).eval()
    x, _ = batch(0)
    with SlotCounter(model) as counter:
        with torch.no_grad():
            model(x)
        counts = counter.take()
        assert counter.take() == {}  # take starts over
    expected = read_rows(model, x)
    assert counts.keys() == expected.keys()
    for name in counts:
        assert torch.equal(counts[name], expected[name])
        assert counts[name].sum() == x.numel() * len(model.memory_layers()) // len(counts) * _reads(model)


def _reads(model) -> int:
    a = model.memory_layers()[0][1].addressing
    return a.heads * a.topk


def test_slot_counter_skips_masked_tokens_and_evaluation_when_asked():
    layer = model_with().memory_layers()[0][1]
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    model = torch.nn.ModuleDict({"layer": layer})
    with SlotCounter(model, training_only=True) as counter:
        layer.train()
        layer(x, mask=mask)
        trained = counter.take()["layer.store"]
        layer.eval()
        layer(x, mask=mask)
        assert counter.take() == {}
    ids = layer.retrieve(x[mask])[0]
    assert torch.equal(trained, torch.bincount(ids.reshape(-1), minlength=64))


def test_background_counts_the_batches_that_read_each_row(tmp_path):
    model = model_with()
    batches = [batch(i)[0] for i in range(4)]
    background = record_background(model, batches)
    assert model.training  # mode restored
    name = "blocks.1.memory.store"
    expected = sum((read_rows(model.eval(), x)[name] > 0).long() for x in batches)
    assert background.docs == 4 and torch.equal(background.df[name], expected)
    assert torch.allclose(background.idf(name), torch.log(5.0 / (1.0 + expected.double())))
    background.save(tmp_path / "bg.pt")
    loaded = Background.load(tmp_path / "bg.pt")
    assert loaded.docs == 4 and torch.equal(loaded.df[name], expected)
    (tmp_path / "bad.pt").write_bytes(b"not a background")
    with pytest.raises(ValueError, match="not a background file"):
        Background.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no batches"):
        record_background(model, [])


def expected_rows(tf: torch.Tensor, idf: torch.Tensor, top_t: int | None) -> torch.Tensor:
    """Brute force: rows by (score desc, id asc), the first top_t with a positive score."""
    score = tf.double() * (idf if top_t is not None else 1.0)
    ranked = sorted(range(len(score)), key=lambda r: (-score[r].item(), r))[: top_t or len(score)]
    return torch.tensor(sorted(r for r in ranked if score[r] > 0), dtype=torch.int64)


@pytest.mark.parametrize("sparse_values", [False, True])
@pytest.mark.parametrize("top_t", [5, None])
def test_only_the_selected_rows_change(sparse_values, top_t):
    model = model_with(options={"sparse_values": sparse_values, "query_norm": "batchnorm"})  # running statistics
    background = record_background(model, [batch(i)[0] for i in range(6)])
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    name = "blocks.1.memory.store"
    with SparseMemoryFinetuning(model, background, top_t) as smf:
        assert [p for p in model.parameters() if p.requires_grad] == smf.parameters()
        optimizer = smf.optimizer(lr=100.0)
        x, y = batch(10)
        micro = [(x[:2], y[:2]), (x[2:], y[2:])]  # gradient accumulation: both micro-batches count
        tf = sum(read_rows(model.train(), xi)[name] for xi, _ in micro)
        model.train()
        for xi, yi in micro:
            model(xi, yi).loss.backward()
        selected = smf.select_rows()[name]
        assert torch.equal(selected, expected_rows(tf, background.idf(name), top_t))
        if top_t is not None:
            assert 0 < len(selected) <= top_t
        optimizer.step()
    table = model.blocks[1].memory.store.weight
    changed = (table != before["blocks.1.memory.store.weight"]).any(-1).nonzero().flatten()
    assert torch.equal(changed, selected)  # every selected row moved, no other
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n]
    for n, p in model.state_dict().items():  # weights and buffers (the BatchNorm's running statistics)
        if n != "blocks.1.memory.store.weight":
            assert torch.equal(p, before[n]), n


def test_a_row_read_in_every_background_batch_is_never_selected():
    model = model_with()
    name = "blocks.1.memory.store"
    with SlotCounter(model) as counter:
        model(batch(0)[0])
        read = counter.take()[name]
    df = torch.where(read > 0, 7, 0)  # every row this batch reads was read in all 7 background batches
    smf = SparseMemoryFinetuning(model, Background(7, {name: df}), top_t=10)
    x, y = batch(0)
    model(x, y).loss.backward()
    assert smf.select_rows()[name].numel() == 0
    assert smf.parameters()[0].grad._nnz() == 0
    assert math.isclose(Background(7, {name: df}).idf(name).max().item(), math.log(8))
    smf.close()


def test_bad_input():
    model = model_with()
    background = record_background(model, [batch(0)[0]])
    with pytest.raises(ValueError, match="top_t must be"):
        SparseMemoryFinetuning(model, background, top_t=0)
    with pytest.raises(ValueError, match="needs the background"):
        SparseMemoryFinetuning(model, None, top_t=4)
    with pytest.raises(ValueError, match="record them on this model"):
        SparseMemoryFinetuning(model, Background(1, {"elsewhere": torch.zeros(3, dtype=torch.int64)}), top_t=4)
    with pytest.raises(ValueError, match="no memory layers"):
        SparseMemoryFinetuning(Transformer(ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2)), None, None)
    with pytest.raises(ValueError, match="top_t must be"):
        SparseMemoryFinetuning(model, background, top_t=True)
    smf = SparseMemoryFinetuning(model, background, top_t=4)
    with pytest.raises(ValueError, match="rule must be one of"):
        smf.optimizer(1.0, rule="lion")
    model.eval()  # an evaluation-mode forward is not counted: finetuning it would silently change nothing
    x, y = batch(0)
    model(x, y).loss.backward()
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        smf.select_rows()
    smf.close()


def test_a_hugging_face_model_finetunes_sparsely_without_its_padding():
    pytest.importorskip("transformers")
    from test_hf import batch as hf_batch
    from test_hf import with_memories

    model = with_memories("llama")  # a pool read by blocks 1 and 3, and block 2's own table
    x, mask = hf_batch()
    background = record_background(model, [{"input_ids": x[:1], "attention_mask": mask[:1]}] * 3)
    assert set(background.df) == {"memlayers_pools.values", "model.layers.2.mlp.memory.store"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with SparseMemoryFinetuning(model, background, top_t=6) as smf:
        optimizer = smf.optimizer(lr=1.0, rule="sgd")
        model.train()
        padded = x.clone()
        padded[1, :3] = 5  # what the padding holds must not matter
        model(input_ids=padded, attention_mask=mask, labels=x).loss.backward()
        counts = {k: v.clone() for k, v in smf.counter.counts.items()}
        selected = smf.select_rows()
        optimizer.step()
    assert all(c.sum() == mask.sum() * 2 * 4 * (2 if "pools" in k else 1) for k, c in counts.items())
    for name, p in model.named_parameters():
        moved = (p != before[name]).reshape(p.shape[0], -1).any(-1).nonzero().flatten()
        if name == "memlayers_pools.values.weight":
            assert torch.equal(moved, selected["memlayers_pools.values"]) and 0 < len(moved) <= 6
        elif name == "model.layers.2.mlp.memory.store.weight":
            assert torch.equal(moved, selected["model.layers.2.mlp.memory.store"])
        else:
            assert len(moved) == 0, name
