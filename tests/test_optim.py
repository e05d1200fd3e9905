import copy

import pytest
import torch

from memlayers import MemoryLayer, ValueTable, build_optimizer, clip_grad_norms, param_groups
from memlayers.optim import SparseRowAdam


def model(sparse=False, shared=False):
    pool = ValueTable(16 * 16, 24, sparse_grad=sparse) if shared else None
    kw = dict(n_keys=16, heads=2, topk=4, sparse_values=sparse)
    layers = [MemoryLayer.from_preset("memory_plus", 24, values=pool, **kw) for _ in range(2)]
    return torch.nn.Sequential(layers[0], torch.nn.Linear(24, 24), layers[1])


def test_param_groups_hygiene():
    m = model(shared=True)
    groups = {g["name"]: g for g in param_groups(m, lr=1e-4, weight_decay=0.1)}
    assert set(groups) == {"decay", "no_decay", "subkeys", "values"}
    assert groups["values"]["params"] == [m[0].values.weight]  # the shared pool, once
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


def test_sparse_adam_leaves_untouched_rows_bit_identical():
    torch.manual_seed(0)
    m = model(sparse=True)
    opt = build_optimizer(m, lr=1e-3, value_optimizer="sparse_adam")
    table = m[0].values.weight
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
    table = m[0].values.weight
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
    with pytest.raises(ValueError, match="use value_optimizer='sparse_adam'"):
        build_optimizer(model(sparse=True), lr=1e-3)
    with pytest.raises(ValueError, match="value_optimizer must be one of"):
        build_optimizer(model(), lr=1e-3, value_optimizer="sgd")


def test_combined_optimizer_with_scheduler_and_checkpoint():
    torch.manual_seed(0)
    m = model(sparse=True, shared=True)
    opt = build_optimizer(m, lr=1e-3, value_optimizer="sparse_adam")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    xs = [torch.randn(4, 24) for _ in range(4)]
    _step(m, opt, xs[0])
    sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["values"] == pytest.approx(5e-3) and lrs["decay"] == pytest.approx(5e-4)
    # resume from a checkpoint: the same next steps as the uninterrupted run
    saved_model, saved_opt, saved_sched = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict()), sched.state_dict()
    for x in xs[1:]:
        _step(m, opt, x)
        sched.step()
    m2 = model(sparse=True, shared=True)
    m2.load_state_dict(saved_model)
    opt2 = build_optimizer(m2, lr=1e-3, value_optimizer="sparse_adam")
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 0.5 ** step)
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
    table = m[0].values.weight
    norm_rest, norm_values = clip_grad_norms(m, max_norm=1.0, value_max_norm=0.5)
    assert norm_rest > 1.0 and norm_values > 0.5
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
    p.grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3), (10, 3), check_invariants=True)
    opt.step()  # no rows touched: nothing changes
    assert torch.equal(p, before)
    p.grad = torch.zeros(10, 3)
    with pytest.raises(RuntimeError, match="needs row-sparse gradients"):
        opt.step()
    with pytest.raises(ValueError, match="need lr > 0"):
        SparseRowAdam([p], lr=0.0)
