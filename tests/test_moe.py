"""MoE dispatch (memlayers.model.moe): the grouped-GEMM and padded paths against the expert-by-expert
reference (outputs, aux loss, gradients of router, experts and input), odd sizes, empty experts, ties,
tiny and empty batches, autocast, and no host sync: torch.compile(fullgraph=True) traces it whole."""

import pytest
import torch
from conftest import DEVICES, TOL, rel_err

from memlayers.model import moe as moe_mod
from memlayers.model.moe import MoE, grouped_experts, grouped_mm_ok, moe_reference, padded_experts
from memlayers.model.transformer import SwiGLU

pytestmark = pytest.mark.usefixtures("one_thread")

# (dim, hidden, experts, topk, tokens): aligned and odd widths, k = 1 .. E, one token, none
SHAPES = [(16, 8, 4, 2, 40), (8, 12, 6, 3, 33), (7, 5, 3, 3, 9), (16, 12, 5, 1, 1), (12, 4, 4, 2, 0)]


def grads(moe: MoE, x: torch.Tensor, forward) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """forward(moe, x) -> (y, aux); returns y, aux and the gradients of router, gate_up, down and x."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y, aux = forward(moe, x)
    torch.manual_seed(1)
    (y * torch.randn_like(y)).sum().add(aux * 3.0).backward()  # random cotangent: every output counts
    return y, aux, [moe.router.weight.grad, moe.gate_up.grad, moe.down.grad, x.grad]


def make(dim, hidden, experts, topk, dtype=torch.float32) -> MoE:
    moe = MoE(dim, hidden, experts, topk).to(dtype)
    moe.reset_parameters(std=0.5)  # routing far from uniform, experts far from linear
    return moe


PATHS = {"grouped": grouped_experts, "padded": padded_experts}


def use_path(monkeypatch, fn) -> None:
    """Make MoE run its expert FFN with ``fn`` instead of ``expert_ffn``'s choice."""
    monkeypatch.setattr(moe_mod, "expert_ffn", fn)


def assert_matches_reference(moe, x, forward, dtype):
    y, aux, g = grads(moe, x, forward)
    y_ref, aux_ref, g_ref = grads(moe, x, moe_reference)
    assert y.shape == x.shape
    if x.shape[0] == 0:
        assert aux.item() == 0.0 and all(t.abs().sum() == 0 for t in g)
        return
    assert rel_err(y, y_ref) < TOL[dtype]
    assert abs(aux.item() - aux_ref.item()) <= TOL[dtype] * aux_ref.item()
    for name, a, b in zip(["router", "gate_up", "down", "x"], g, g_ref):
        assert rel_err(a, b) < TOL[dtype], name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dispatch_matches_reference(shape, dtype):
    dim, hidden, experts, topk, tokens = shape
    moe = make(dim, hidden, experts, topk, dtype)
    x = torch.randn(tokens, dim, dtype=dtype)
    assert_matches_reference(moe, x, MoE.__call__, dtype)


@pytest.mark.parametrize("path", ["grouped", "padded"])
@pytest.mark.parametrize("shape", [(16, 8, 4, 2, 40), (8, 4, 6, 3, 17), (16, 8, 5, 1, 1)], ids=str)
def test_each_path_matches_reference(path, shape, monkeypatch):
    dim, hidden, experts, topk, tokens = shape  # widths aligned for the grouped GEMM (fp32: multiples of 4)
    moe = make(dim, hidden, experts, topk)
    use_path(monkeypatch, PATHS[path])
    assert_matches_reference(moe, torch.randn(tokens, dim), MoE.__call__, torch.float32)


def test_dispatch_choice():
    """fp32/bf16 on CPU at aligned widths: the grouped GEMM; float64 or unaligned widths: padded."""
    ok = lambda dim, hidden, dtype: grouped_mm_ok(
        torch.zeros(3, dim, dtype=dtype), torch.zeros(2, dim, 2 * hidden, dtype=dtype),
        torch.zeros(2, hidden, dim, dtype=dtype),
    )  # fmt: skip
    assert ok(16, 8, torch.float32) and ok(16, 8, torch.bfloat16) and ok(8, 8, torch.bfloat16)
    assert not ok(16, 8, torch.float64) and not ok(6, 8, torch.float32) and not ok(16, 6, torch.float32)
    assert not ok(12, 8, torch.bfloat16)  # bf16 needs multiples of 8


@pytest.mark.parametrize("path", ["grouped", "padded"])
def test_collapsed_and_empty_experts(path, monkeypatch):
    """Every token on the same k experts: the other experts get no slot and a zero gradient."""
    moe = make(16, 8, 6, 2)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[4, 0] = moe.router.weight[1, 0] = 50.0
    x = torch.randn(25, 16)
    x[:, 0] = x[:, 0].abs() + 1.0  # experts 4 and 1 win for every token
    use_path(monkeypatch, PATHS[path])
    assert_matches_reference(moe, x, MoE.__call__, torch.float32)
    g = moe.gate_up.grad
    assert g[[0, 2, 3, 5]].abs().sum() == 0 and g[1].abs().sum() > 0 and g[4].abs().sum() > 0


@pytest.mark.parametrize("path", ["grouped", "padded"])
def test_ties(path, monkeypatch):
    """A zero router: all E probabilities tie; both sides break the tie by topk's order, weights 1/k."""
    moe = make(16, 8, 4, 2)
    with torch.no_grad():
        moe.router.weight.zero_()
    use_path(monkeypatch, PATHS[path])
    assert_matches_reference(moe, torch.randn(10, 16), MoE.__call__, torch.float32)


@pytest.mark.parametrize("path", ["grouped", "padded"])
def test_every_output_row_written(path, monkeypatch):
    """The un-sort back to slot order starts from ``empty_like``: poisoned with NaN, none may survive."""
    nan_like = lambda t, **kw: torch.full_like(t, float("nan"), **kw)
    monkeypatch.setattr(torch, "empty_like", nan_like)
    use_path(monkeypatch, PATHS[path])
    assert_matches_reference(make(16, 8, 5, 3), torch.randn(19, 16), MoE.__call__, torch.float32)


@pytest.mark.parametrize("block", [1, 2, 8, 64])
def test_padded_block_sizes(block, monkeypatch):
    """Any block height gives the same result: one row per block up to one block for everything."""
    moe = make(8, 6, 5, 2, torch.float64)
    use_path(monkeypatch, lambda *a: padded_experts(*a, block=block))
    assert_matches_reference(moe, torch.randn(23, 8, dtype=torch.float64), MoE.__call__, torch.float64)


def test_block_rows_bounds():
    """Default block height B: a power of two >= 8, nb <= 5E blocks, and above 8 the padding E*B stays
    under slots / 2 + 2E (the docstring's "padded rows < 1.5 M")."""
    for slots, experts in [(4096, 10), (32768, 18), (40, 4), (1, 1), (0, 3), (1000, 7), (4097, 10)]:
        B = moe_mod._block_rows(slots, experts)
        nb = (slots + experts * (B - 1)) // B
        assert B >= 8 and B & (B - 1) == 0 and nb <= 5 * experts
        assert B == 8 or experts * B < slots / 2 + 2 * experts


def test_batch_shape_and_batch_independence():
    moe = make(16, 8, 4, 2)
    x = torch.randn(3, 7, 16)
    y, _ = moe(x)
    assert y.shape == (3, 7, 16)
    torch.testing.assert_close(moe(x[1:2])[0], y[1:2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16_without_host_sync(device):
    """Under bf16 autocast (training on a GPU), against the fp32 reference; two of the six experts get no
    token and must get exactly zero gradient (a grouped kernel may leave them garbage). On CUDA the forward
    and backward run under ``set_sync_debug_mode("error")``, which raises on any device-to-host sync."""
    moe = make(16, 8, 6, 2).to(device)
    with torch.no_grad():
        moe.router.weight[:, 0] = 0.0
        moe.router.weight[[0, 3], 0] = -100.0  # experts 0 and 3 never win: feature 0 is >= 1
    x = torch.randn(40, 16, device=device)
    x[:, 0] = x[:, 0].abs() + 1.0

    def forward(m, x):
        with torch.autocast(device, dtype=torch.bfloat16):
            return m(x)

    forward(moe, x)  # warm-up: first-call allocations and library set-up may sync
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux, g = grads(moe, x, forward)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    y_ref, aux_ref, g_ref = grads(moe, x, moe_reference)
    assert y.dtype == torch.float32 and aux.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[torch.bfloat16] and aux.item() == pytest.approx(aux_ref.item(), rel=1e-2)
    for name, a, b in zip(["router", "gate_up", "down", "x"], g, g_ref):
        assert rel_err(a, b) < 2 * TOL[torch.bfloat16], name
    assert g[1][[0, 3]].abs().sum() == 0 and g[2][[0, 3]].abs().sum() == 0


def _compile_ok() -> bool:
    try:
        import torch._dynamo
    except ImportError:
        return False
    return torch._dynamo.is_dynamo_supported()


@pytest.mark.skipif(not _compile_ok(), reason="torch.compile (dynamo) is not supported on this Python/platform")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_whole_without_host_syncs(dtype):
    """A host read of routing data (tolist, item, bincount, nonzero) is a graph break, and fullgraph=True
    raises on any (the expert loop this replaced had 2); aot_eager also traces the backward (aot_autograd).
    bf16 takes the grouped GEMM, fp32 the padded path (the grouped GEMM's shape function accepts only
    bf16 when tracing)."""
    torch._dynamo.reset()
    moe = make(16, 8, 4, 2, dtype)
    x = torch.randn(2, 9, 16, dtype=dtype)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    y, aux, g = grads(moe, x, lambda m, x: compiled(x))
    y_ref, aux_ref, g_ref = grads(moe, x, MoE.__call__)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol and abs(aux.item() - aux_ref.item()) < tol
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < tol


def test_one_expert_is_the_dense_swiglu():
    """E = 1, k = 1: the MoE is the dense SwiGLU FFN with the expert's weights (the limit every MoE must reach)."""
    moe, ffn = make(16, 24, 1, 1), SwiGLU(16, 24)
    with torch.no_grad():
        ffn.gate_up.weight.copy_(moe.gate_up[0].T)
        ffn.down.weight.copy_(moe.down[0].T)
    x = torch.randn(37, 16)
    y, aux = moe(x)
    assert rel_err(y, ffn(x)) < TOL[torch.float32] and aux.item() == pytest.approx(1.0)
