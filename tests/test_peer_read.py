"""PEER's read (``memlayers.ops.peer_read``): the plain-PyTorch reference against autograd through the definition, the
numba kernels (``cpu_peer.py``) against the reference, and which path ``peer_read`` takes."""

import pytest
import torch
from conftest import count_calls, poison_allocations, rel_err, torch_threads

from memlayers.ops.peer_read import ACTIVATIONS, peer_read, reference

SHAPES = [(0, 3, 10, 4, 5), (1, 1, 1, 1, 1), (7, 3, 5, 33, 9), (300, 16, 1000, 21, 64), (200, 40, 97, 8, 130)]


def inputs(T, L, N, d_in, d_out, dtype=torch.float32):
    g = torch.Generator().manual_seed(T + L)
    u, v = torch.randn(N, d_in, generator=g, dtype=dtype) * d_in**-0.5, torch.randn(N, d_out, generator=g, dtype=dtype)
    ids = torch.randint(0, N, (T, L), generator=g)
    weights, x = torch.randn(T, L, generator=g, dtype=dtype), torch.randn(T, d_in, generator=g, dtype=dtype)
    return u, v, ids, weights, x, torch.randn(T, d_out, generator=g, dtype=dtype)


def definition(u, v, ids, weights, x, activation):
    h = (u[ids] * x.unsqueeze(1)).sum(-1)  # (T, L)
    return ((weights * ACTIVATIONS[activation](h)).unsqueeze(-1) * v[ids]).sum(1)


@pytest.mark.parametrize("T,L,N,d_in,d_out", SHAPES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_reference_is_the_definition(T, L, N, d_in, d_out, activation):
    u, v, ids, weights, x, g = inputs(T, L, N, d_in, d_out, torch.float64)
    y, h = reference.peer_read(u, v, ids, weights, x, activation)
    leaves = [t.clone().requires_grad_() for t in (u, v, weights, x)]
    want = definition(leaves[0], leaves[1], ids, leaves[2], leaves[3], activation)
    assert rel_err(y, want) < 1e-12 if T else y.shape == (0, d_out)
    if T:
        exp = torch.autograd.grad((want * g).sum(), leaves)
        got = reference.peer_read_backward(u, v, ids, weights, x, h, g, activation)
        for a, b in zip(got, exp):
            assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("T,L,N,d_in,d_out", SHAPES)
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_match_reference(T, L, N, d_in, d_out, activation, threads, monkeypatch):
    """Every output written (allocations poisoned), 1 and 2 threads, within float32 rounding of the reference."""
    cpu_peer = pytest.importorskip("memlayers.ops.peer_read.cpu_peer")
    u, v, ids, weights, x, g = inputs(T, L, N, d_in, d_out)
    y, h = reference.peer_read(u, v, ids, weights, x, activation)
    want = (y, h, *reference.peer_read_backward(u, v, ids, weights, x, h, g, activation))
    poison_allocations(monkeypatch)
    with torch_threads(threads):
        y, h = cpu_peer.peer_read_cpu(u, v, ids, weights, x, activation)
        got = (y, h, *cpu_peer.peer_read_backward_cpu(u, v, ids, weights, x, h, g, activation))
    for a, b in zip(got, want):
        assert a.shape == b.shape and (rel_err(a, b) < 1e-5 if b.abs().sum() else torch.equal(a, b))


def test_kernels_refuse_what_they_cannot_run():
    cpu_peer = pytest.importorskip("memlayers.ops.peer_read.cpu_peer")
    u, v, ids, weights, x, _ = inputs(5, 3, 10, 4, 6)
    with pytest.raises(ValueError, match="activations"):
        cpu_peer.peer_read_cpu(u, v, ids, weights, x, "gelu")
    with pytest.raises(ValueError, match="need u"):
        cpu_peer.peer_read_cpu(u, v[:9], ids, weights, x, "identity")
    ids[1, 2] = 10
    with pytest.raises(IndexError, match=r"ids must be in \[0, 10\)"):
        cpu_peer.peer_read_cpu(u, v, ids, weights, x, "identity")


@pytest.mark.parametrize(
    "activation,sparse,impl,fused",
    [("identity", False, "auto", True), ("relu", False, "auto", True), ("gelu", False, "auto", False),
     ("identity", True, "auto", False), ("identity", False, "reference", False)],
)  # fmt: skip
def test_which_path_and_the_same_gradients(activation, sparse, impl, fused, monkeypatch):
    """The fused kernels for float32 CPU tensors, dense gradients and a fused activation; the composition of
    ``gather_dot`` and ``embedding_bag`` otherwise; the same output and gradients either way."""
    pytest.importorskip("numba")
    import memlayers.ops.peer_read.cpu_peer  # noqa: F401 (for count_calls)

    calls = count_calls(monkeypatch, "memlayers.ops.peer_read.cpu_peer", "peer_read_cpu")
    u, v, ids, weights, x, g = inputs(1200, 16, 500, 12, 24)  # 19,200 entries: above CPU_KERNEL_MIN_ELEMENTS
    leaves = [t.clone().requires_grad_() for t in (u, v, weights, x)]
    out = peer_read(leaves[0], leaves[1], ids, leaves[2], leaves[3], activation, sparse, impl)
    got = torch.autograd.grad((out * g).sum(), leaves)
    assert calls == ([1] if fused else [])
    want = definition(*[t.double() for t in (u, v)], ids, *[t.double() for t in (weights, x)], activation)
    assert rel_err(out, want) < 1e-5
    exp = torch.autograd.grad((definition(leaves[0], leaves[1], ids, leaves[2], leaves[3], activation) * g).sum(),
                              leaves)  # fmt: skip
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 1e-5


def test_unknown_activation_is_refused():
    u, v, ids, weights, x, _ = inputs(2, 3, 10, 4, 6)
    with pytest.raises(ValueError, match="activation must be one of"):
        peer_read(u, v, ids, weights, x, "tanh")


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_kernels_at_nan_and_inf_pre_activations_and_on_any_threads(activation):
    """NaN and ±inf pre-activations (a token's x NaN or inf): the reference's values and gradients (relu's gradient
    passes a NaN, as autograd's); the same floats on one and two threads."""
    cpu_peer = pytest.importorskip("memlayers.ops.peer_read.cpu_peer")
    u, v, ids, weights, x, g = inputs(300, 16, 500, 12, 24)
    x[3], x[5], x[7] = float("nan"), float("inf"), -float("inf")
    y, h = reference.peer_read(u, v, ids, weights, x, activation)
    want = (y, h, *reference.peer_read_backward(u, v, ids, weights, x, h, g, activation))
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            y, h = cpu_peer.peer_read_cpu(u, v, ids, weights, x, activation)
            runs.append((y, h, *cpu_peer.peer_read_backward_cpu(u, v, ids, weights, x, h, g, activation)))
    for a, b, c in zip(*runs, want):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_float_ids_are_refused():
    u, v, ids, weights, x, _ = inputs(2, 3, 10, 4, 6)
    with pytest.raises(TypeError, match="ids must be int64 or int32"):
        peer_read(u, v, ids.float(), weights, x, "identity")
