import copy

import pytest
import torch

from memlayers import MemoryLayer, ValueTable, build_optimizer, clip_grad_norms, embedding_bag, param_groups
from memlayers.optim import (
    VALUE_LR_RATIOS,
    VALUE_OPTIMIZERS,
    SparseRowAdagrad,
    SparseRowAdam,
    SparseRowSGD,
    row_sparse_grad,
)


def model(sparse=False, shared=False):
    pool = ValueTable(16 * 16, 24, sparse_grad=sparse) if shared else None
    kw = dict(n_keys=16, heads=2, topk=4, sparse_values=sparse)
    layers = [MemoryLayer.from_preset("memory_plus", 24, pool=pool, **kw) for _ in range(2)]
    m = PoolOwner(layers[0], torch.nn.Linear(24, 24), layers[1])
    if shared:
        m.pool = pool  # the model owns the pool
    return m


class PoolOwner(torch.nn.Sequential):
    def forward(self, x):
        for name, module in self._modules.items():
            x = x if name == "pool" else module(x)
        return x


def test_param_groups_hygiene():
    m = model(shared=True)
    groups = {g["name"]: g for g in param_groups(m, lr=1e-4, weight_decay=0.1)}
    assert set(groups) == {"decay", "no_decay", "subkeys", "values"}
    assert groups["values"]["params"] == [m[0].store.weight]  # the shared pool, once
    assert groups["values"]["lr"] == pytest.approx(1e-3) and groups["values"]["weight_decay"] == 0
    assert groups["subkeys"]["weight_decay"] == 0 and len(groups["subkeys"]["params"]) == 2
    assert groups["decay"]["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    n_grouped = sum(len(g["params"]) for g in groups.values())
    assert n_grouped == len(list(m.parameters()))
    assert {g["name"]: g["lr"] for g in param_groups(m, 1e-4, value_lr=5e-3)}["values"] == 5e-3


def _step(m, opt, x):
    opt.zero_grad()
    m(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("kind", VALUE_OPTIMIZERS[1:])
def test_sparse_optimizers_leave_untouched_rows_bit_identical(kind):
    torch.manual_seed(0)
    m = model(sparse=True)
    opt = build_optimizer(m, lr=1e-3, value_optimizer=kind)
    table = m[0].store.weight
    x1, x2 = torch.randn(4, 24), torch.randn(4, 24)
    touched1 = m[0].retrieve(x1)[0].unique()
    before = table.detach().clone()
    _step(m, opt, x1)
    after1 = table.detach().clone()
    untouched = torch.ones(table.shape[0], dtype=torch.bool)
    untouched[touched1] = False
    assert torch.equal(after1[untouched], before[untouched])
    assert not torch.equal(after1[touched1], before[touched1])
    # step 2 reads other rows: rows read only in step 1 must not move again (no ghost momentum)
    only1 = torch.zeros_like(untouched)
    only1[touched1] = True
    only1[m[0].retrieve(x2)[0].unique()] = False
    assert only1.any()
    _step(m, opt, x2)
    assert torch.equal(table.detach()[only1], after1[only1])


def test_dense_adamw_moves_rows_that_are_no_longer_read():
    """The contrast: dense AdamW keeps moving rows read once (momentum), which sparse_adam avoids."""
    torch.manual_seed(0)
    m = model()
    opt = build_optimizer(m, lr=1e-3)
    table = m[0].store.weight
    x1, x2 = torch.randn(4, 24), torch.randn(4, 24)
    only1 = torch.zeros(table.shape[0], dtype=torch.bool)
    only1[m[0].retrieve(x1)[0].unique()] = True
    only1[m[0].retrieve(x2)[0].unique()] = False
    _step(m, opt, x1)
    after1 = table.detach().clone()
    _step(m, opt, x2)
    assert not torch.equal(table.detach()[only1], after1[only1])


def test_sparse_adam_first_step_equals_adam_on_touched_rows():
    torch.manual_seed(0)
    sparse, dense = model(sparse=True), model()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(5, 24)
    for m, kind in ((sparse, "sparse_adam"), (dense, "adamw")):
        # SparseAdam and AdamW place eps differently; a tiny eps makes both lr * g / |g| on step one
        _step(m, build_optimizer(m, lr=1e-3, weight_decay=0.0, eps=1e-20, value_optimizer=kind), x)
    for a, b in zip(sparse.parameters(), dense.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_optimizer_mismatch_errors():
    with pytest.raises(ValueError, match="sparse_values=True"):
        build_optimizer(model(sparse=False), lr=1e-3, value_optimizer="sparse_adam")
    with pytest.raises(ValueError, match="use value_optimizer in"):
        build_optimizer(model(sparse=True), lr=1e-3)
    with pytest.raises(ValueError, match="value_optimizer must be one of"):
        build_optimizer(model(), lr=1e-3, value_optimizer="sgd")


def test_combined_optimizer_with_scheduler_and_checkpoint():
    torch.manual_seed(0)
    m = model(sparse=True, shared=True)
    opt = build_optimizer(m, lr=1e-3, value_optimizer="sparse_adam")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    xs = [torch.randn(4, 24) for _ in range(4)]
    _step(m, opt, xs[0])
    sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["values"] == pytest.approx(5e-3) and lrs["decay"] == pytest.approx(5e-4)
    # resume from a checkpoint: the same next steps as the uninterrupted run
    saved_model, saved_opt, saved_sched = (
        copy.deepcopy(m.state_dict()),
        copy.deepcopy(opt.state_dict()),
        sched.state_dict(),
    )
    for x in xs[1:]:
        _step(m, opt, x)
        sched.step()
    m2 = model(sparse=True, shared=True)
    m2.load_state_dict(saved_model)
    opt2 = build_optimizer(m2, lr=1e-3, value_optimizer="sparse_adam")
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 0.5**step)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    for x in xs[1:]:
        _step(m2, opt2, x)
        sched2.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another value_optimizer"):
        opt2.load_state_dict({"optimizers": [{}]})


@pytest.mark.parametrize("sparse", [False, True])
def test_clip_values_separately(sparse):
    torch.manual_seed(0)
    m = model(sparse=sparse, shared=True)
    (m(torch.randn(8, 24)) * 1000).sum().backward()
    table = m[0].store.weight
    norm_rest, norm_values = clip_grad_norms(m, max_norm=1.0, value_max_norm=0.5)
    assert norm_rest > 1.0 and norm_values > 0.5
    if sparse:
        assert table.grad.is_coalesced()  # summed once, for the norm; clipping keeps it so for the step
    value_grad = table.grad.coalesce()._values() if sparse else table.grad
    assert value_grad.norm() == pytest.approx(0.5, rel=1e-4)
    rest = torch.stack([p.grad.norm() for p in m.parameters() if p is not table])
    assert rest.norm() == pytest.approx(1.0, rel=1e-4)


def test_clip_norms_agree_between_sparse_and_dense_grads():
    torch.manual_seed(0)
    sparse, dense = model(sparse=True, shared=True), model(shared=True)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(8, 24)
    for m in (sparse, dense):
        m(x).sum().backward()  # both layers read the shared pool: sparse grads must be summed
    ns = clip_grad_norms(sparse, None, None)
    nd = clip_grad_norms(dense, None, None)
    assert torch.allclose(ns[1], nd[1], rtol=1e-5) and torch.allclose(ns[0], nd[0], rtol=1e-5)


def test_sparse_row_adam_equals_torch_sparse_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50, 7))
    b = torch.nn.Parameter(a.detach().clone())
    ours = SparseRowAdam([a], lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    ref = torch.optim.SparseAdam([b], lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    for step in range(6):
        rows = torch.randint(0, 50, (20,))  # repeated rows: the gradient must be summed per row
        grad = torch.sparse_coo_tensor(rows[None], torch.randn(20, 7), (50, 7), check_invariants=True)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        assert torch.allclose(a, b, atol=1e-6), step
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(ours.state[a][key], ref.state[b][key], atol=1e-6)


def test_sparse_row_adam_edge_cases():
    p = torch.nn.Parameter(torch.randn(10, 3))
    opt = SparseRowAdam([p])
    before = p.detach().clone()
    p.grad = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3), (10, 3), check_invariants=True
    )
    opt.step()  # no rows touched: nothing changes
    assert torch.equal(p, before)
    p.grad = torch.zeros(10, 3)
    with pytest.raises(RuntimeError, match="needs row-sparse gradients"):
        opt.step()
    with pytest.raises(ValueError, match="need lr > 0"):
        SparseRowAdam([p], lr=0.0)


def test_row_sparse_grad_skips_coalescing_when_rows_are_already_unique():
    table = torch.nn.Parameter(torch.randn(50, 6))
    idx, w = torch.randint(0, 50, (9, 4)), torch.rand(9, 4)
    embedding_bag(table, idx, w, sparse_grad=True).sum().backward()
    assert not table.grad.is_coalesced()  # autograd's accumulation drops the flag the bag set
    values_ptr = table.grad._values().data_ptr()
    rows, grads = row_sparse_grad(table)
    assert table.grad.is_coalesced() and grads.data_ptr() == values_ptr  # marked, not copied
    assert torch.equal(rows, idx.unique())
    # a second backward pass appends entries: rows repeat, so the gradient must really be coalesced
    embedding_bag(table, idx[:3], w[:3], sparse_grad=True).sum().backward()
    expect = table.grad.coalesce()
    rows, grads = row_sparse_grad(table)
    assert torch.equal(rows, expect._indices()[0]) and torch.allclose(grads, expect._values())
    assert table.grad.is_coalesced()


@pytest.mark.parametrize("cls", [SparseRowAdagrad, SparseRowSGD])
def test_sparse_adagrad_and_sgd_sum_repeated_rows_and_match_the_math(cls):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, 7))
    opt = cls([p], lr=0.05)
    expect, sum_sq = p.detach().double().clone(), torch.zeros(50, dtype=torch.float64)
    for _ in range(4):
        rows = torch.randint(0, 50, (20,))  # repeated rows: the gradient is summed per row
        vals = torch.randn(20, 7)
        p.grad = torch.sparse_coo_tensor(rows[None], vals, (50, 7), check_invariants=True)
        opt.step()
        g = torch.zeros(50, 7, dtype=torch.float64).index_add_(0, rows, vals.double())
        hit = torch.zeros(50, dtype=torch.bool)
        hit[rows] = True
        if cls is SparseRowAdagrad:
            sum_sq[hit] += g[hit].square().mean(1)
            expect[hit] -= 0.05 * g[hit] / (sum_sq[hit].sqrt() + 1e-8)[:, None]
        else:
            expect[hit] -= 0.05 * g[hit]
        assert torch.allclose(p.double(), expect, atol=1e-5)
    if cls is SparseRowAdagrad:
        assert opt.state[p]["sum_sq"].shape == (50,) and opt.state[p]["sum_sq"].dtype == torch.float32
        assert torch.allclose(opt.state[p]["sum_sq"].double(), sum_sq, rtol=1e-5)
    with pytest.raises(ValueError, match="need lr > 0"):
        cls([p], lr=0.0)
    p.grad = torch.zeros(50, 7)
    with pytest.raises(RuntimeError, match=f"{cls.__name__} needs row-sparse gradients"):
        opt.step()


@pytest.mark.parametrize("kind", VALUE_OPTIMIZERS)
def test_every_value_optimizer_checkpoints_and_resumes_exactly(kind):
    torch.manual_seed(0)
    sparse = kind != "adamw"
    a = model(sparse=sparse)
    opt_a = build_optimizer(a, lr=1e-2, value_optimizer=kind)
    xs = [torch.randn(6, 24) for _ in range(4)]
    for x in xs[:2]:
        _step(a, opt_a, x)
    b = copy.deepcopy(a)
    opt_b = build_optimizer(b, lr=1e-2, value_optimizer=kind)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for x in xs[2:]:
        _step(a, opt_a, x)
        _step(b, opt_b, x)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kind", VALUE_OPTIMIZERS)
def test_value_lr_defaults_to_the_optimizers_own_ratio(kind):
    m = model(sparse=kind != "adamw")
    lrs = {g["name"]: g["lr"] for g in build_optimizer(m, lr=1e-3, value_optimizer=kind).param_groups}
    assert lrs["values"] == pytest.approx(VALUE_LR_RATIOS[kind] * 1e-3) and lrs["decay"] == 1e-3
    lrs = {g["name"]: g["lr"] for g in build_optimizer(m, lr=1e-3, value_optimizer=kind, value_lr_ratio=3).param_groups}
    assert lrs["values"] == pytest.approx(3e-3)
    lrs = {g["name"]: g["lr"] for g in build_optimizer(m, lr=1e-3, value_optimizer=kind, value_lr=0.5).param_groups}
    assert lrs["values"] == 0.5


def test_adagrad_accumulator_stays_fp32_through_a_checkpoint():
    p = torch.nn.Parameter(torch.randn(20, 6).to(torch.bfloat16))
    opt = SparseRowAdagrad([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 4]]), torch.randn(2, 6).to(torch.bfloat16), (20, 6), check_invariants=True
    )
    opt.step()
    again = SparseRowAdagrad([p], lr=0.1)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch casts state to the parameter's dtype
    assert again.state[p]["sum_sq"].dtype == torch.float32
    assert torch.equal(again.state[p]["sum_sq"], opt.state[p]["sum_sq"])
