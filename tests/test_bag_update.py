"""``memlayers.ops.bag_update``: the reference against the obvious computation (a dense bag's autograd
gradient, then ``row_update``'s reference update), stochastic rounding, and input checking.

The Triton kernel is compared with the reference in ``test_bag_update_triton.py``.
"""

import pytest
import torch
from conftest import rel_err

from memlayers.ops.bag_update import bag_update, bag_update_reference
from memlayers.ops.bag_update.reference import stochastic_round_bf16
from memlayers.ops.row_update import row_adagrad_reference, row_adam_reference, row_sgd_reference

HYPER = {"beta1": 0.8, "beta2": 0.95, "eps": 1e-6}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def problem(N=40, d=19, E=60, S=9, dtype=torch.float32, device="cpu", seed=0, hot=None):
    """param (N, d), state for every rule (earlier steps' moments/accumulators), ids (E,) with repeats
    (``hot``: that row in every other entry), weights (E,), src_rows (E,), src (S, d)."""
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(N, d, generator=g).to(device, dtype)
    ids = torch.randint(0, N, (E,), generator=g)
    if hot is not None:
        ids[::2] = hot
    weights = torch.randn(E, generator=g)
    src_rows = torch.randint(0, S, (E,), generator=g)
    src = torch.randn(S, d, generator=g)
    states = {
        "adam": {
            "exp_avg": (0.1 * torch.randn(N, d, generator=g)).to(device, dtype),
            "exp_avg_sq": (0.01 * torch.rand(N, d, generator=g)).to(device, dtype),
        },
        "adagrad": {"sum_sq": torch.rand(N, generator=g).to(device)},
        "sgd": {},
    }
    return param, states, ids.to(device), weights.to(device), src_rows.to(device), src.to(device, dtype)


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def naive_update(param, state, ids, weights, src_rows, src, rule, lr, step, beta1, beta2, eps):
    """The gradient by autograd of a dense bag (loss = sum_s <src[s], bag_s(param)>), then ``row_update``'s
    reference on its nonzero rows. Returns (param, state, sum of g·g, dw = d loss / d weights)."""
    param, state = param.clone(), clone_state(state)
    p = param.double().requires_grad_()
    w = weights.double().requires_grad_()
    bags = torch.zeros(src.shape[0], param.shape[1], dtype=torch.float64, device=param.device)
    bags = bags.index_add(0, src_rows.long(), w[:, None] * p[ids.long()])
    grad, dw = torch.autograd.grad((bags * src.double()).sum(), (p, w))
    rows = torch.unique(ids.long())
    g = grad[rows].float()
    if rule == "adam":
        row_adam_reference(param, state["exp_avg"], state["exp_avg_sq"], rows, g, lr, beta1, beta2, eps, step)
    elif rule == "adagrad":
        row_adagrad_reference(param, state["sum_sq"], rows, g, lr, eps)
    else:
        row_sgd_reference(param, rows, g, lr)
    return param, state, (grad[rows] ** 2).sum(), dw


def run(impl, param, state, ids, weights, src_rows, src, rule, **kw):
    """Copies of (param, state) after bag_update through ``impl``, its return value and the weight gradient."""
    param, state = param.clone(), clone_state(state)
    dw = torch.full(ids.shape, float("nan"), device=param.device)
    hyper = {"lr": 0.1, "step": 3, **HYPER, **kw}
    sq = bag_update(param, state, ids, weights, src_rows, src, rule, impl=impl, weight_grad_out=dw, **hyper)
    return param, state, sq, dw


def check_against_naive(ours, inputs, rule, tol, lr=0.1, step=3):
    """``ours`` = run(...) on ``inputs`` = problem(...)'s tensors: equal to the naive update, every
    untouched row bit-identical."""
    param, states, ids, weights, src_rows, src = inputs
    state = states[rule]
    p, s, sq, dw = ours
    p_ref, s_ref, sq_ref, dw_ref = naive_update(param, state, ids, weights, src_rows, src, rule, lr, step, **HYPER)
    rows = torch.unique(ids.long())
    assert rel_err(p[rows], p_ref[rows]) < tol
    if param.dtype == torch.float32:  # the update itself, not just the (much larger) parameter
        assert rel_err(p[rows] - param[rows], p_ref[rows] - param[rows]) < 1e-5
    for name in s:
        assert rel_err(s[name][rows], s_ref[name][rows]) < (1e-5 if s[name].dtype == torch.float32 else tol)
    assert abs(sq.item() - sq_ref.item()) <= 1e-5 * sq_ref.item() and sq.dtype == torch.float32
    assert rel_err(dw, dw_ref) < (1e-5 if src.dtype == torch.float32 else 1e-2)
    keep = torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
    keep[rows] = False
    assert torch.equal(bits(p[keep]), bits(param[keep]))
    for name in s:
        assert torch.equal(bits(s[name][keep]), bits(state[name][keep]))
    assert not torch.equal(p[rows], param[rows])


@pytest.mark.parametrize("rule", ["adam", "adagrad", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_dense_autograd(rule, dtype):
    inputs = problem(dtype=dtype, hot=5)
    ours = run("reference", *inputs[:1], inputs[1][rule], *inputs[2:], rule)
    check_against_naive(ours, inputs, rule, TOL[dtype])


@pytest.mark.parametrize("rule", ["adam", "adagrad", "sgd"])
def test_tensor_lr_and_step_give_the_same_update(rule):
    param, states, *rest = problem()
    floats = run("reference", param, states[rule], *rest, rule, lr=0.05, step=7)
    tensors = run("reference", param, states[rule], *rest, rule, lr=torch.tensor(0.05), step=torch.tensor(7))
    as_float = run("reference", param, states[rule], *rest, rule, lr=torch.tensor(0.05), step=torch.tensor(7.0))
    for other in (tensors, as_float):
        assert torch.equal(other[0], floats[0]) and all(torch.equal(other[1][k], floats[1][k]) for k in floats[1])


def test_empty_changes_nothing():
    param, states, ids, weights, src_rows, src = problem()
    p, s, sq, dw = run("reference", param, states["adam"], ids[:0], weights[:0], src_rows[:0], src, "adam")
    assert torch.equal(p, param) and all(torch.equal(s[k], states["adam"][k]) for k in s)
    assert sq.item() == 0 and dw.shape == (0,)


def test_auto_on_cpu_is_the_reference():
    param, states, *rest = problem()
    auto = run("auto", param, states["adagrad"], *rest, "adagrad")
    ref = run("reference", param, states["adagrad"], *rest, "adagrad")
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1]["sum_sq"], ref[1]["sum_sq"])


def neighbours(exact: torch.Tensor):
    """The two bf16 values around each fp32 value (equal when it is a bf16 value), as fp32 bit patterns."""
    low = bits(exact) & -(1 << 16)  # towards zero
    return low, torch.where(bits(exact) == low, low, low + (1 << 16))  # away from zero


def identical_rows(impl, dtype, seed, stochastic, device="cpu", U=64, d=24):
    """U identical rows, each read once with the same gradient, so every row's fp32 result is the same:
    the rows are independent samples of its rounding. Returns (the result, the exact fp32 result)."""
    g = torch.Generator().manual_seed(1)
    param = torch.randn(d, generator=g).to(device, dtype).repeat(U, 1)
    src = (torch.randn(1, d, generator=g) * 1e-2).to(device, dtype)
    ids, weights = torch.arange(U, device=device), torch.ones(U, device=device)
    src_rows = torch.zeros(U, dtype=torch.int64, device=device)
    exact = param.float()
    bag_update(exact, {}, ids, weights, src_rows, src, "sgd", lr=0.37, impl="reference")
    out = param.clone()
    bag_update(
        out, {}, ids, weights, src_rows, src, "sgd", lr=0.37, stochastic_rounding=stochastic, seed=seed, impl=impl
    )
    return out, exact


def check_stochastic_rounding(impl, device="cpu"):
    """Each element one of its two bf16 neighbours; the mean over the rows unbiased (within 5 standard
    deviations, where rounding to nearest is not); other seeds give other roundings, the same seed as
    an int or a tensor the same."""
    out, exact = identical_rows(impl, torch.bfloat16, 3, True, device)
    out, exact = out.cpu(), exact.cpu()
    low, high = neighbours(exact)
    got = bits(out.float())
    assert ((got == low) | (got == high)).all()
    ulp = (high.view(torch.float32).double() - low.view(torch.float32).double()).abs()[0]
    inexact = ulp > 0
    assert inexact.float().mean() > 0.8  # the test rounds something
    sigma = ulp[inexact] / 2 / out.shape[0] ** 0.5  # bound on the standard deviation of the mean over rows
    assert ((out.double().mean(0) - exact.double()[0])[inexact] / sigma).abs().max() < 5
    nearest = exact.to(torch.bfloat16).double().mean(0)
    assert ((nearest - exact.double()[0])[inexact] / sigma).abs().max() > 5
    other, _ = identical_rows(impl, torch.bfloat16, 4, True, device)
    assert not torch.equal(out, other.cpu())
    again, _ = identical_rows(impl, torch.bfloat16, torch.tensor(3, device=device), True, device)
    assert torch.equal(out, again.cpu())


def test_reference_stochastic_rounding():
    check_stochastic_rounding("reference")
    off, exact = identical_rows("reference", torch.bfloat16, 3, False)
    assert torch.equal(off, exact.to(torch.bfloat16))  # off: round to nearest


def test_stochastic_round_keeps_nan_inf_and_picks_a_neighbour():
    finite = torch.tensor([1.5, -2.0, 0.0, 3.0e38, -1.0e-3, 7.123456])
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    payloads = torch.tensor([0x7F800001, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)  # NaNs
    g = torch.Generator().manual_seed(0)
    low, high = neighbours(finite)
    for _ in range(20):
        y = stochastic_round_bf16(torch.cat([finite, special, payloads]), g).float()
        assert ((bits(y[:6]) == low) | (bits(y[:6]) == high)).all()
        assert torch.equal(y[6:8], special[:2]) and y[8:].isnan().all()


def bad(**change):
    param, states, ids, weights, src_rows, src = problem(N=6, d=4, E=5, S=3)
    kw = {"param": param, "state": states["adam"], "ids": ids, "weights": weights, "src_rows": src_rows, "src": src}
    return {**kw, "rule": "adam", "lr": 0.1, "step": 1, **change}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rule": "lamb"}, "rule must be one of"),
        ({"impl": "fast"}, "impl must be one of"),
        ({"param": torch.zeros(6)}, "param must be a 2-D"),
        ({"state": {"exp_avg": torch.zeros(6, 4)}}, "needs state with keys"),
        ({"state": {"exp_avg": torch.zeros(6, 4), "exp_avg_sq": torch.zeros(6, 3)}}, r"state\['exp_avg_sq'\]"),
        (
            {"rule": "adagrad", "state": {"sum_sq": torch.zeros(6, 4)}},
            r"state\['sum_sq'\] must be a float tensor of shape \(6,\)",
        ),
        ({"ids": torch.zeros(5)}, "ids must be a 1-D"),
        ({"ids": torch.zeros(5, 1, dtype=torch.int64)}, "ids must be a 1-D"),
        ({"weights": torch.zeros(4)}, "weights must be"),
        ({"src_rows": torch.zeros(5)}, "src_rows must be"),
        ({"src": torch.zeros(3, 5)}, r"src must be a float \(S, 4\)"),
        ({"lr": -1.0}, "lr >= 0"),
        ({"lr": torch.zeros(1)}, "lr must be a Python number or a 0-dim"),
        ({"lr": "0.1"}, "lr must be a Python number"),
        ({"step": None}, "needs step"),
        ({"step": 0}, "step must be >= 1"),
        ({"step": torch.zeros(2)}, "step must be"),
        ({"beta1": 1.0}, "betas"),
        ({"eps": 0.0}, "eps > 0"),
        ({"stochastic_rounding": True}, "needs a bfloat16 param"),
        ({"weight_grad_out": torch.zeros(4)}, "weight_grad_out must be"),
    ],
)
def test_bad_inputs_name_the_problem(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bag_update(**bad(**change))


def test_bad_seed_and_mixed_devices():
    kw = bad()
    kw["param"], kw["state"] = kw["param"].bfloat16(), {k: v.bfloat16() for k, v in kw["state"].items()}
    with pytest.raises(TypeError, match="seed must be"):
        bag_update(**kw, stochastic_rounding=True, seed=1.5)
    with pytest.raises(ValueError, match="must be on one device"):
        bag_update(**bad(ids=torch.zeros(5, dtype=torch.int64, device="meta")))


def test_reference_function_is_exported():
    param, states, *rest = problem()
    p = param.clone()
    sq = bag_update_reference(p, clone_state(states["sgd"]), *rest, "sgd", lr=0.1)
    assert sq.dtype == torch.float32 and not torch.equal(p, param)
