"""The numba bags by destination (``ops/embedding_bag/cpu_bag_into.py``) against the reference: the dense value
gradient (``reference.value_grad``), beside the weight gradient (``reference.weight_grad``), the keyed bag forward
(``reference.bag_forward`` with ``bags``), and ``gather_dot``'s two gradients."""

import pytest
import torch
from conftest import count_calls, poison_allocations, rel_err, torch_threads

pytest.importorskip("numba")

from memlayers.ops import embedding_bag, gather_dot
from memlayers.ops.embedding_bag.cpu_bag_into import (
    bag_backward_cpu,
    gather_dot_backward_cpu,
    keyed_bag_cpu,
    value_grad_cpu,
)
from memlayers.ops.embedding_bag.reference import bag_forward, value_grad, weight_grad


@pytest.mark.parametrize(
    "T,L,N,d", [(0, 4, 10, 8), (1, 1, 1, 1), (7, 3, 5, 33), (300, 64, 1000, 16), (513, 40, 97, 130)]
)
@pytest.mark.parametrize("keyed", [False, True])
def test_matches_reference(T, L, N, d, keyed, monkeypatch):
    """Random and repeated rows, plain and keyed bags, every output row written (allocations poisoned)."""
    indices = torch.randint(0, N, (T, L))
    weights = torch.randn(T, L)
    bags = torch.randint(0, 11, (T, L)) if keyed else None
    grad_out = torch.randn(11 if keyed else T, d)
    want = value_grad(indices, weights, grad_out, N, bags)
    poison_allocations(monkeypatch)
    for threads in (1, 2):
        with torch_threads(threads):
            got = value_grad_cpu(indices, weights, grad_out, N, bags)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert rel_err(got, want) < 1e-5 if want.abs().sum() > 0 else torch.equal(got, want)


def test_deterministic_over_thread_counts():
    indices, weights, grad_out = torch.randint(0, 50, (4000, 16)), torch.randn(4000, 16), torch.randn(4000, 24)
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            runs.append(value_grad_cpu(indices, weights, grad_out, 50, None))
    assert torch.equal(*runs)


def test_rows_outside_the_table_add_nowhere():
    indices = torch.tensor([[0, 5, -1, 2]])
    got = value_grad_cpu(indices, torch.ones(1, 4), torch.ones(1, 3), 3, None)
    assert torch.equal(got, torch.tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3]))


def test_the_bag_and_gather_dot_backwards_use_it(monkeypatch):
    """Dense gradients of float32 CPU bags and gather_dot go through the kernel; MEMLAYERS_CPU_KERNELS=0 and
    impl="reference" through the reference; the gradients agree."""
    calls = count_calls(monkeypatch, "memlayers.ops.embedding_bag.cpu_bag_into", "value_grad_cpu")
    values = torch.randn(40, 8, requires_grad=True)  # 2,000 x 40 entries: above CPU_KERNEL_MIN_ELEMENTS
    indices, weights, x = torch.randint(0, 40, (2000, 40)), torch.randn(2000, 40), torch.randn(2000, 8)

    def grads(**kw):
        values.grad = None
        (
            embedding_bag(values, indices, weights, **kw).square().sum() + gather_dot(values, indices, x, **kw).sum()
        ).backward()
        return values.grad.clone()

    auto = grads()
    assert calls == [1, 1]
    reference = grads(impl="reference")
    monkeypatch.setenv("MEMLAYERS_CPU_KERNELS", "0")
    off = grads()
    assert calls == [1, 1]
    assert rel_err(auto, reference) < 1e-5 and torch.equal(reference, off)


@pytest.mark.parametrize(
    "T,L,N,d,num_bags", [(0, 3, 5, 4, 6), (1, 1, 1, 1, 1), (40, 7, 30, 33, 90), (2000, 32, 500, 16, 8000)]
)
def test_keyed_bag_forward_matches_reference(T, L, N, d, num_bags, monkeypatch):
    values, weights = torch.randn(N, d), torch.randn(T, L)
    indices, bags = torch.randint(0, N, (T, L)), torch.randint(0, num_bags, (T, L))
    want = bag_forward(values, indices, weights, bags, num_bags)
    poison_allocations(monkeypatch)
    got = keyed_bag_cpu(values, indices, weights, bags, num_bags)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5 if want.abs().sum() > 0 else torch.equal(got, want)


@pytest.mark.parametrize("bad", ["indices", "bags"])
def test_keyed_bag_forward_refuses_ids_out_of_range(bad):
    indices, bags = torch.randint(0, 4, (5, 3)), torch.randint(0, 6, (5, 3))
    (indices if bad == "indices" else bags)[2, 1] = -1
    with pytest.raises(IndexError, match=rf"{bad} must be in \[0, {4 if bad == 'indices' else 6}\), got \[-1, "):
        keyed_bag_cpu(torch.randn(4, 2), indices, torch.randn(5, 3), bags, 6)
    with pytest.raises(IndexError, match=r"bags must be in \[0, 6\)"):
        embedding_bag(
            torch.randn(4, 2), indices.clamp(min=0), torch.randn(5, 3), bags=bags.clamp(min=0) + 6, num_bags=6
        )


def test_keyed_bags_use_it(monkeypatch):
    calls = count_calls(monkeypatch, "memlayers.ops.embedding_bag.cpu_bag_into", "keyed_bag_cpu")
    values, weights = torch.randn(20, 4), torch.randn(3000, 25)  # 75,000 entries: above CPU_KERNEL_MIN_ELEMENTS
    indices, bags = torch.randint(0, 20, (3000, 25)), torch.randint(0, 5, (3000, 25))
    got = embedding_bag(values, indices, weights, bags=bags, num_bags=5)
    assert calls == [1]
    want = embedding_bag(values, indices, weights, bags=bags, num_bags=5, impl="reference")
    assert calls == [1] and rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
    "T,L,N,d", [(0, 4, 10, 8), (1, 1, 1, 1), (7, 3, 5, 33), (300, 64, 1000, 16), (513, 40, 97, 21)]
)
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_backward_matches_reference(T, L, N, d, keyed, threads, monkeypatch):
    """``bag_backward_cpu``: the value gradient of ``value_grad_cpu`` (the same sums) and the weight gradient of the
    reference, one on each thread; every output written (allocations poisoned), 1 and 2 threads."""
    values, indices, weights = torch.randn(N, d), torch.randint(0, N, (T, L)), torch.randn(T, L)
    bags = torch.randint(0, 11, (T, L)) if keyed else None
    grad_out = torch.randn(11 if keyed else T, d)
    want_dv = value_grad_cpu(indices, weights, grad_out, N, bags)
    want_dw = weight_grad(values, indices, grad_out, bags)
    poison_allocations(monkeypatch)
    with torch_threads(threads):
        dv, dw = bag_backward_cpu(values, indices, weights, grad_out, bags)
    assert torch.equal(dv, want_dv) and dw.shape == (T, L) and dw.dtype == torch.float32
    assert rel_err(dw, want_dw) < 1e-5 if T else dw.numel() == 0


@pytest.mark.parametrize("bad", ["indices", "bags"])
def test_fused_backward_refuses_ids_out_of_range(bad):
    indices, bags = torch.randint(0, 4, (5, 3)), torch.randint(0, 6, (5, 3))
    (indices if bad == "indices" else bags)[1, 2] = -3
    with pytest.raises(IndexError, match=rf"{bad} must be in \[0, {4 if bad == 'indices' else 6}\), got \[-3, "):
        bag_backward_cpu(torch.randn(4, 2), indices, torch.randn(5, 3), torch.randn(6, 2), bags)


@pytest.mark.parametrize("rows", [5000, 40])
@pytest.mark.parametrize("values_grad", [True, False])
def test_bags_whose_weights_need_grad_use_the_two_pass_backward(rows, values_grad, monkeypatch):
    """Both gradients needed: ``bag_backward_cpu`` (the value gradient and the dots at once), for a table larger or
    much smaller than its 80,000 entries; the weights' alone: the dots. Either way, the reference's gradients."""
    calls = count_calls(monkeypatch, "memlayers.ops.embedding_bag.cpu_bag_into", "bag_backward_cpu")
    values = torch.randn(rows, 16, requires_grad=values_grad)  # grad_out (2,000, 16): above CPU_KERNEL_MIN_ELEMENTS
    indices, weights = torch.randint(0, rows, (2000, 40)), torch.randn(2000, 40, requires_grad=True)

    def grads(**kw):
        values.grad = weights.grad = None
        embedding_bag(values, indices, weights, **kw).square().sum().backward()
        return [t.grad.clone() for t in (values, weights) if t.requires_grad]

    kernels = grads()
    assert calls == ([1] if values_grad else [])
    reference = grads(impl="reference")
    assert len(calls) == values_grad and all(rel_err(a, b) < 1e-5 for a, b in zip(kernels, reference))


@pytest.mark.parametrize(
    "T,L,N,d", [(0, 4, 10, 8), (1, 1, 1, 1), (7, 3, 5, 33), (300, 64, 1000, 16), (513, 40, 97, 21)]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_dot_backward_matches_reference(T, L, N, d, threads, monkeypatch):
    """``gather_dot_backward_cpu``: the table's gradient (the bag's value gradient with weights grad_out, rows x) and
    x's (the bag over the table), each the same sums as its bag; every output written, 1 and 2 threads."""
    table, ids, x, grad_out = torch.randn(N, d), torch.randint(0, N, (T, L)), torch.randn(T, d), torch.randn(T, L)
    want_table = value_grad_cpu(ids, grad_out, x, N)
    want_x = bag_forward(table, ids, grad_out)
    poison_allocations(monkeypatch)
    with torch_threads(threads):
        got_table, got_x = gather_dot_backward_cpu(table, ids, x, grad_out)
    assert torch.equal(got_table, want_table)
    assert got_x.shape == (T, d) and (rel_err(got_x, want_x) < 1e-5 if T else True)


def test_gather_dot_backward_refuses_what_it_cannot_read():
    table, ids = torch.randn(4, 3), torch.randint(0, 4, (5, 2))
    with pytest.raises(ValueError, match="do not fit"):
        gather_dot_backward_cpu(table, ids, torch.randn(5, 2), torch.randn(5, 2))
    ids[2, 1] = 4
    with pytest.raises(IndexError, match=r"ids must be in \[0, 4\)"):
        gather_dot_backward_cpu(table, ids, torch.randn(5, 3), torch.randn(5, 2))


def test_gather_dot_with_both_gradients_uses_the_kernel(monkeypatch):
    calls = count_calls(monkeypatch, "memlayers.ops.embedding_bag.cpu_bag_into", "gather_dot_backward_cpu")
    table = torch.randn(500, 16, requires_grad=True)
    ids, x = torch.randint(0, 500, (2000, 12)), torch.randn(2000, 16, requires_grad=True)
    g = torch.randn(2000, 12)

    def grads(**kw):
        return torch.autograd.grad((gather_dot(table, ids, x, **kw) * g).sum(), (table, x))

    kernels, reference = grads(), grads(impl="reference")
    assert calls == [1] and all(rel_err(a, b) < 1e-5 for a, b in zip(kernels, reference))
