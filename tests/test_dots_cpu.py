"""The numba per-entry dot products (``ops/embedding_bag/cpu_dots.py``) against the reference
(``reference.weight_grad``): the bag's weight gradient and ``gather_dot``'s forward."""

import pytest
import torch
from conftest import count_calls, poison_allocations, rel_err, torch_threads

pytest.importorskip("numba")

from memlayers.ops import embedding_bag, gather_dot
from memlayers.ops.embedding_bag.cpu_dots import dots_cpu
from memlayers.ops.embedding_bag.reference import weight_grad


@pytest.mark.parametrize(
    "T,L,N,d", [(0, 4, 10, 8), (1, 1, 1, 1), (7, 3, 5, 33), (300, 64, 1000, 16), (513, 40, 97, 21)]
)
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference(T, L, N, d, keyed, threads, monkeypatch):
    """Random and repeated rows, plain and keyed, every output written (allocations poisoned), 1 and 2 threads."""
    table, indices = torch.randn(N, d), torch.randint(0, N, (T, L))
    bags = torch.randint(0, 11, (T, L)) if keyed else None
    x = torch.randn(11 if keyed else T, d)
    want = weight_grad(table, indices, x, bags)
    poison_allocations(monkeypatch)
    with torch_threads(threads):
        got = dots_cpu(table, indices, x, bags)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5 if want.numel() else got.numel() == 0


def test_strided_inputs_and_threads_agree():
    table = torch.randn(64, 50)[:, ::2]  # (64, 25), not contiguous
    indices = torch.randint(0, 64, (40, 3000)).t()  # (3000, 40), not contiguous
    x = torch.randn(25, 3000).t()
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            runs.append(dots_cpu(table, indices, x))
    assert torch.equal(*runs) and rel_err(runs[0], weight_grad(table, indices, x)) < 1e-5


@pytest.mark.parametrize("bad", ["indices", "bags"])
def test_refuses_ids_out_of_range(bad):
    indices, bags = torch.randint(0, 4, (5, 3)), torch.randint(0, 6, (5, 3))
    (indices if bad == "indices" else bags)[2, 1] = 4 if bad == "indices" else 6
    with pytest.raises(IndexError, match=rf"{bad} must be in \[0, {4 if bad == 'indices' else 6}\), got \[0, "):
        dots_cpu(torch.randn(4, 2), indices, torch.randn(6, 2), bags)


def test_the_bag_backward_and_gather_dot_use_it(monkeypatch):
    """Float32 CPU bags' weight gradients and gather_dot's forward go through the kernel; MEMLAYERS_CPU_KERNELS=0 and
    impl="reference" through the reference; they agree."""
    calls = count_calls(monkeypatch, "memlayers.ops.embedding_bag.cpu_dots", "dots_cpu")
    values = torch.randn(40, 16)  # x and grad_out (2,000, 16): above CPU_KERNEL_MIN_ELEMENTS
    indices, x = torch.randint(0, 40, (2000, 40)), torch.randn(2000, 16)
    weights = torch.randn(2000, 40, requires_grad=True)

    def run(**kw):
        weights.grad = None
        embedding_bag(values, indices, weights, **kw).square().sum().backward()
        return weights.grad.clone(), gather_dot(values, indices, x, **kw)

    auto = run()
    assert calls == [1, 1]
    reference = run(impl="reference")
    monkeypatch.setenv("MEMLAYERS_CPU_KERNELS", "0")
    off = run()
    assert calls == [1, 1]
    for got, want, same in zip(auto, reference, off):
        assert rel_err(got, want) < 1e-5 and torch.equal(want, same)
