"""``torch.compile(fullgraph=True)``: every memory kind traces whole (no graph break), its ops as single
custom-op nodes, and computes what it computes eagerly, forward and every gradient, in training and in eval;
so does a whole model. ``aot_eager`` traces forward and backward as the default backend does, without the
minutes inductor would take here.

Row-sparse value gradients (``sparse_values``) and the fused update (``fused_values``) are outside this
promise: their gradients have a data-dependent size or are applied inside the backward, and compile breaks
the graph there (README, "torch.compile")."""

import importlib

import pytest
import torch
from conftest import count_calls, rel_err

import memlayers
from memlayers import MemoryLayer
from memlayers.model import MemorySpec, ModelConfig, MoESpec, Transformer

TINY = {
    "pkm": {"n_keys": 8, "topk": 4},
    "memory": {"n_keys": 8, "topk": 4},
    "memory_plus": {"n_keys": 8, "topk": 4},
    "peer": {"n_keys": 8, "topk": 4, "heads": 2},
    "ultramem": {"n_keys": 8, "topk": 4, "heads": 2},
    "ultramem_v2": {"n_keys": 8, "topk": 4},
    "engram": {"hash_heads": 2, "d_ngram": 8, "table_size": 7},
}


def run_both(module, inputs):
    """(eager, compiled) pairs of (output, {name: grad}) of ``module(**inputs).square().sum()``'s backward."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    results = []
    for run in (module, compiled):
        torch.manual_seed(1)  # the same dropout masks
        module.zero_grad(set_to_none=True)
        y = run(**inputs)
        if torch.is_tensor(y):
            y.square().sum().backward()
        else:  # a model's output: train on its losses
            (y.loss + y.aux_loss).backward()
            y = y.logits
        results.append((y.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    return results


def assert_same(results, min_grads=3):
    (y0, g0), (y1, g1) = results
    assert rel_err(y1, y0) < 1e-5
    assert g0.keys() == g1.keys() and len(g0) >= min_grads
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 1e-5, name


def test_every_kind_is_covered():
    assert set(TINY) == set(memlayers.PRESETS)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", sorted(TINY))
def test_layer_compiles_whole_and_matches_eager(kind, training):
    torch.manual_seed(0)
    layer = MemoryLayer.from_preset(kind, 32, **TINY[kind]).train(training)
    inputs = {"x": torch.randn(2, 6, 32), "mask": torch.rand(2, 6) > 0.2}
    if layer.needs_token_ids:
        inputs["token_ids"] = torch.randint(0, 50, (2, 6))
    assert_same(run_both(layer, inputs))


@pytest.mark.parametrize("kind", ["memory_plus", "peer", "ultramem", "ultramem_v2"])
def test_layer_with_the_cpu_kernels_compiles_whole(kind, monkeypatch):
    """Above the numba kernels' size threshold (2,100 tokens): the kernels run inside the custom ops of the compiled
    graph (none on its fake tensors), and it computes what eager mode computes without the dispatcher."""
    pytest.importorskip("numba")
    select = importlib.import_module("memlayers.ops.product_key_topk.cpu_select")
    name = "tucker_select_cpu" if kind.startswith("ultramem") else "product_key_select_cpu"
    calls = count_calls(monkeypatch, select.__name__, name)
    torch.manual_seed(0)
    layer = MemoryLayer.from_preset(kind, 32, n_keys=16, topk=4, heads=2).train()
    assert_same(run_both(layer, {"x": torch.randn(3, 700, 32)}))
    assert len(calls) == 2  # the eager run's and the compiled graph's


def test_model_compiles_whole_and_matches_eager():
    """Memory+ layers sharing a pool (one beside an FFN), an MoE block, the loss: one graph."""
    torch.manual_seed(0)
    options = {"n_keys": 8, "topk": 4, "heads": 2}
    cfg = ModelConfig(
        vocab_size=50, dim=32, n_layers=4, n_heads=2, max_seq_len=16,
        moe=MoESpec(layers="2", experts=4, topk=2, hidden=16),
        memories=[MemorySpec("1", pool="p", options=options), MemorySpec("3", pool="p", mode="beside", options=options)],
    )  # fmt: skip
    tokens = torch.randint(0, 50, (2, 12))
    assert_same(run_both(Transformer(cfg), {"idx": tokens, "targets": tokens.roll(-1, 1)}), min_grads=20)


@pytest.mark.parametrize("kind", ["memory_plus", "peer"])
def test_layer_on_the_kernels_compiles_whole(kind, monkeypatch):
    """The Triton path (interpreted on CPU): the selection, the bag, gather_dot and the selected scores'
    backward are custom ops too."""
    pytest.importorskip("triton")
    from conftest import TRITON_DEVICE

    kernels = set()

    def use_triton(op, impl, tensor, problem=None):
        kernels.add(op)
        return problem is None

    for name in ("embedding_bag", "embedding_bag.library", "gather_dot.library", "product_key_topk"):
        monkeypatch.setattr(importlib.import_module(f"memlayers.ops.{name}"), "use_triton", use_triton)
    torch.manual_seed(0)
    layer = MemoryLayer.from_preset(kind, 32, **TINY[kind]).to(TRITON_DEVICE)
    assert_same(run_both(layer, {"x": torch.randn(2, 6, 32, device=TRITON_DEVICE)}))
    assert kernels == ({"product_key_topk", "embedding_bag"} | ({"gather_dot"} if kind == "peer" else set()))
