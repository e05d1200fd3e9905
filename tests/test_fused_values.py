"""The value update inside the backward (``build_optimizer(..., fused_values=True)``) against the unfused path."""

import copy

import pytest
import torch

from memlayers import MemoryLayer, ValueTable, build_optimizer, clip_grad_norms
from memlayers.optim import FusedRowOptimizer, set_lr

RULES = ("sparse_adam", "sparse_adagrad", "sparse_sgd")


class TwoReaders(torch.nn.Module):
    """Two Memory+ layers reading one shared pool, with a dense layer between them."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.pool = ValueTable(16 * 16, 24, sparse_grad=sparse)
        kw = dict(n_keys=16, heads=2, topk=4, sparse_values=sparse)
        self.first = MemoryLayer.from_preset("memory_plus", 24, pool=self.pool, **kw)
        self.mid = torch.nn.Linear(24, 24)
        self.second = MemoryLayer.from_preset("memory_plus", 24, pool=self.pool, **kw)

    def forward(self, x):
        return self.second(self.mid(self.first(x)))


def pair(rule: str, seed: int = 0, device: str = "cpu"):
    """The same model twice: (unfused with row-sparse gradients, fused), with their optimizers."""
    torch.manual_seed(seed)
    plain = TwoReaders(sparse=True).to(device)
    fused = copy.deepcopy(plain)
    return (
        (plain, build_optimizer(plain, lr=1e-2, value_optimizer=rule, value_lr_ratio=10.0)),
        (fused, build_optimizer(fused, lr=1e-2, value_optimizer=rule, value_lr_ratio=10.0, fused_values=True)),
    )


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_params(a, b, tol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert rel_err(q.detach(), p.detach()) < tol, name


def train(m, opt, batches, micro: int = 1):
    for x in batches:
        opt.zero_grad(set_to_none=True)
        parts = x.chunk(micro)
        for i, xs in enumerate(parts):
            loss = m(xs).square().sum() / x.shape[0]
            if i < micro - 1 and isinstance(opt.optimizers[-1], FusedRowOptimizer):
                with opt.accumulate():
                    loss.backward()
            else:
                loss.backward()
        opt.step()


@pytest.mark.parametrize("rule", RULES)
def test_fused_equals_unfused_on_a_shared_pool(rule):
    (plain, opt_p), (fused, opt_f) = pair(rule)
    batches = [torch.randn(12, 24) for _ in range(4)]
    train(plain, opt_p, batches)
    train(fused, opt_f, batches)
    assert not torch.equal(plain.pool.weight, TwoReaders(True).pool.weight)  # the values did move
    assert_same_params(plain, fused)
    assert fused.pool.weight.grad is None  # no value gradient was ever kept


@pytest.mark.parametrize("rule", RULES)
def test_micro_batches_are_applied_once_with_their_sum(rule):
    (plain, opt_p), (fused, opt_f) = pair(rule, seed=1)
    batches = [torch.randn(12, 24) for _ in range(3)]
    train(plain, opt_p, batches, micro=3)
    train(fused, opt_f, batches, micro=3)
    assert_same_params(plain, fused)


def test_step_applies_what_accumulate_left_collected():
    (plain, opt_p), (fused, opt_f) = pair("sparse_adam", seed=2)
    x = torch.randn(8, 24)
    train(plain, opt_p, [x])
    before = fused.pool.weight.detach().clone()
    opt_f.zero_grad()
    with opt_f.accumulate():
        fused(x).square().sum().div(8).backward()
    assert torch.equal(fused.pool.weight, before)  # collected, not applied yet
    opt_f.step()
    assert_same_params(plain, fused)


def test_untouched_rows_and_state_stay_bit_identical():
    (_, _), (fused, opt) = pair("sparse_adam", seed=3)
    before = fused.pool.weight.detach().clone()
    train(fused, opt, [torch.randn(2, 24)])
    changed = (fused.pool.weight != before).any(1)
    state = opt.optimizers[-1].state[fused.pool.weight]
    assert 0 < changed.sum() < len(changed)
    assert torch.equal(changed, (state["exp_avg"] != 0).any(1))
    assert float(state["step"]) == 1 and state["step"].device == fused.pool.weight.device


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_lr_is_a_device_scalar_set_in_place():
    (_, _), (fused, opt) = pair("sparse_sgd")
    group = opt.optimizers[-1].param_groups[0]
    lr = group["lr"]
    assert torch.is_tensor(lr) and lr.dim() == 0
    set_lr(group, 0.5)
    assert group["lr"] is lr and float(lr) == 0.5
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizers[-1], lambda step: 0.0 if step else 1.0)
    sched.step()
    assert group["lr"] is lr and float(lr) == 0.0
    before = fused.pool.weight.detach().clone()
    train(fused, opt, [torch.randn(4, 24)])
    assert torch.equal(fused.pool.weight, before)  # lr 0: nothing moves


def test_state_dict_round_trip_resumes_exactly():
    (_, _), (a, opt_a) = pair("sparse_adam", seed=4)
    batches = [torch.randn(6, 24) for _ in range(4)]
    train(a, opt_a, batches[:2])
    b = copy.deepcopy(a)
    opt_b = build_optimizer(b, lr=1e-2, value_optimizer="sparse_adam", fused_values=True)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    train(a, opt_a, batches[2:])
    train(b, opt_b, batches[2:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_unfused_norm_and_fused_grad_norm_agree():
    (plain, opt_p), (fused, opt_f) = pair("sparse_adam", seed=5)
    x = torch.randn(8, 24)
    plain(x).square().sum().backward()
    fused(x).square().sum().backward()
    _, value_norm = clip_grad_norms(plain, None, None)
    assert rel_err(opt_f.optimizers[-1].grad_norm(), value_norm) < 1e-5
    assert float(clip_grad_norms(fused, None, None)[1]) == 0  # the fused tables hold no gradient


def test_rebuilding_unfused_restores_gradients():
    (_, _), (fused, _) = pair("sparse_adam")
    build_optimizer(fused, lr=1e-2, value_optimizer="sparse_adam")
    fused(torch.randn(3, 24)).sum().backward()
    assert fused.pool.weight.grad is not None and fused.pool.weight.grad._nnz() > 0


def test_bad_setups_fail_with_one_clear_line():
    m = TwoReaders(sparse=False)
    with pytest.raises(ValueError, match="value_optimizer in"):
        build_optimizer(m, lr=1e-2, fused_values=True)
    with pytest.raises(ValueError, match="fused_values=True too"):
        build_optimizer(m, lr=1e-2, value_optimizer="sparse_adam", stochastic_rounding=True)
    with pytest.raises(ValueError, match="bfloat16 value tables"):
        build_optimizer(m, lr=1e-2, value_optimizer="sparse_adam", fused_values=True, stochastic_rounding=True)


def test_a_dropped_optimizer_or_a_bypassing_read_is_loud():
    (_, _), (fused, opt) = pair("sparse_adam")
    del opt
    with pytest.raises(RuntimeError, match="no longer exists"):
        fused(torch.randn(3, 24)).sum().backward()
    (_, _), (fused, opt) = pair("sparse_adam")
    with pytest.raises(RuntimeError, match="bypassed the fused update"):
        (fused(torch.randn(3, 24)).sum() + fused.pool.weight.sum()).backward()


def test_bf16_stochastic_rounding_moves_rows_to_a_bf16_neighbour():
    torch.manual_seed(6)
    m = TwoReaders(sparse=False).to(torch.bfloat16)
    opt = build_optimizer(m, lr=1e-2, value_optimizer="sparse_sgd", fused_values=True, stochastic_rounding=True)
    before = m.pool.weight.detach().clone()
    train(m, opt, [torch.randn(4, 24, dtype=torch.bfloat16)])
    assert m.pool.weight.dtype == torch.bfloat16 and not torch.equal(m.pool.weight, before)
    assert torch.isfinite(m.pool.weight.float()).all()


def test_a_copied_model_is_not_attached():
    (_, _), (fused, opt) = pair("sparse_adam")
    twin = copy.deepcopy(fused)
    assert twin.pool.value_grad_sink is None
    twin(torch.randn(3, 24)).sum().backward()
    assert twin.pool.weight.grad is not None and twin.pool.weight.grad._nnz() > 0  # plain row-sparse gradient


def test_engram_tables_update_inside_the_backward_too():
    torch.manual_seed(7)
    plain = MemoryLayer.from_preset("engram", 32, table_size=97, sparse_values=True)
    fused = copy.deepcopy(plain)
    opts = [
        build_optimizer(m, lr=1e-2, value_optimizer="sparse_adagrad", fused_values=f)
        for m, f in ((plain, False), (fused, True))
    ]
    for _ in range(3):
        x, ids = torch.randn(2, 5, 32), torch.randint(0, 50, (2, 5))
        for m, opt in zip((plain, fused), opts):
            opt.zero_grad()
            m(x, token_ids=ids).square().sum().backward()
            opt.step()
    assert_same_params(plain, fused)


@pytest.mark.parametrize("kind", ["peer", "ultramem", "ultramem_v2"])
def test_kinds_without_bag_reads_refuse(kind):
    layer = MemoryLayer.from_preset(kind, 32)
    with pytest.raises(ValueError, match="cannot update its values inside the backward"):
        build_optimizer(layer, lr=1e-2, value_optimizer="sparse_adam", fused_values=True)


@pytest.mark.parametrize("rule", ["sparse_adam", "sparse_adagrad"])
def test_fused_kernel_equals_unfused_reference(rule):
    """The fused update on its Triton kernel (interpreted on CPU) against the unfused reference path."""
    pytest.importorskip("triton")
    from conftest import TRITON_DEVICE

    (plain, opt_p), (fused, opt_f) = pair(rule, seed=8, device=TRITON_DEVICE)
    opt_f.optimizers[-1].impl = "triton"
    batches = [torch.randn(6, 24, device=TRITON_DEVICE) for _ in range(2)]
    train(plain, opt_p, batches)
    train(fused, opt_f, batches)
    assert_same_params(plain, fused)
