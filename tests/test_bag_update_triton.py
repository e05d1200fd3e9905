"""The Triton ``bag_update`` kernel against the reference and the naive dense computation.

Without a GPU the kernel runs on CPU under ``TRITON_INTERPRET=1`` (programs one after another: indexing,
masking and arithmetic are checked, not races; the interpreter truncates fp32 -> bf16 on store where
GPUs round to nearest, which the 1e-2 tolerance of 16-bit tables absorbs). Small chunks force rows cut
by chunk borders and several carry levels. With a GPU the same tests run the compiled kernel on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import TOL, poison_allocations, rel_err
from conftest import TRITON_DEVICE as DEVICE
from test_bag_update import (
    HYPER,
    bits,
    check_against_naive,
    check_stochastic_rounding,
    identical_rows,
    neighbours,
    problem,
    run,
)

from memlayers.ops.bag_update import bag_update, triton_kernel


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Buffers the wrappers allocate with empty/empty_like start as NaN (floats) or 7 (ints)."""
    poison_allocations(monkeypatch)


def both(inputs, rule, **kw):
    """(Triton, reference) runs of bag_update on ``inputs`` = problem(...)."""
    param, states, *rest = inputs
    return [run(impl, param, states[rule], *rest, rule, **kw) for impl in ("triton", "reference")]


def assert_close(ours, ref, tol):
    (p, s, sq, dw), (p_ref, s_ref, sq_ref, dw_ref) = ours, ref
    assert rel_err(p, p_ref) < tol and rel_err(dw, dw_ref) < 1e-5
    for name in s:
        assert rel_err(s[name], s_ref[name]) < tol
    assert abs(sq.item() - sq_ref.item()) <= 1e-5 * sq_ref.item()


@pytest.mark.parametrize("rule", ["adam", "adagrad", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_and_naive(rule, dtype, chunk):
    """d = 19 (masked columns); row 5 in every other entry (20 of 40, cut by many chunks of 5), the others
    repeated at random; chunks of 5 positions: three carry levels."""
    chunk(5)
    inputs = problem(E=40, dtype=dtype, hot=5, device=DEVICE)
    ours, ref = both(inputs, rule)
    check_against_naive(ours, inputs, rule, TOL[dtype])
    assert_close(ours, ref, TOL[dtype])


def test_one_row_read_by_every_entry(chunk):
    """Every chunk inside the one segment: its sum and a zero carry, level after level."""
    chunk(4)
    param, states, ids, *rest = problem(E=48, device=DEVICE)
    inputs = (param, states, torch.full_like(ids, 3), *rest)
    ours, ref = both(inputs, "adagrad")
    check_against_naive(ours, inputs, "adagrad", 1e-5)
    assert_close(ours, ref, 1e-5)


@pytest.mark.parametrize("rule", ["adam", "adagrad", "sgd"])
def test_rows_wider_than_a_block_loop_over_column_blocks(rule, chunk, monkeypatch):
    """MAX_BLOCK_D = 16: d = 37 takes three column blocks (Adagrad sums g·g over all of them first)."""
    monkeypatch.setattr(triton_kernel, "MAX_BLOCK_D", 16)
    chunk(8)
    inputs = problem(N=20, d=37, E=24, hot=2, device=DEVICE)
    ours, ref = both(inputs, rule)
    check_against_naive(ours, inputs, rule, 1e-5)
    assert_close(ours, ref, 1e-5)


def test_tensor_lr_step_and_seed_need_no_host_sync(monkeypatch):
    """lr, step and seed as device tensors: no Tensor -> Python conversion at all; the same update as floats."""
    param, states, *rest = problem(dtype=torch.bfloat16, device=DEVICE)
    floats = run("triton", param, states["adam"], *rest, "adam", lr=0.05, step=7)
    conversions = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _f=real, **k: conversions.append(_n) or _f(self, *a, **k)
        )
    lr, seed = torch.tensor(0.05, device=DEVICE), torch.tensor(11, device=DEVICE)
    tensors = run("triton", param, states["adam"], *rest, "adam", lr=lr, step=torch.tensor(7, device=DEVICE))
    rounded = run("triton", param, states["adam"], *rest, "adam", lr=lr, step=torch.tensor(7.0, device=DEVICE),
                  stochastic_rounding=True, seed=seed)  # fmt: skip
    monkeypatch.undo()
    assert conversions == []
    for ours in (tensors, rounded):
        assert rel_err(ours[0], floats[0]) < 1e-2 and rel_err(ours[1]["exp_avg_sq"], floats[1]["exp_avg_sq"]) < 1e-2
    assert torch.equal(tensors[1]["exp_avg"], floats[1]["exp_avg"]) and not torch.equal(rounded[0], tensors[0])


def test_untouched_rows_are_never_read_or_written(chunk):
    chunk(4)
    param, states, ids, *rest = problem(N=50, device=DEVICE)
    keep = torch.ones(50, dtype=torch.bool, device=DEVICE)
    keep[ids] = False
    for t in (param, *states["adam"].values()):
        t[keep] = float("nan")
    p, state, sq, _ = run("triton", param, states["adam"], ids, *rest, "adam")
    for new, old in ((p, param), *((state[k], states["adam"][k]) for k in state)):
        assert torch.equal(bits(new[keep]), bits(old[keep]))  # the same NaN payloads
        assert new[~keep].isfinite().all()
    assert sq.isfinite()


def test_bitwise_deterministic(chunk):
    chunk(4)
    inputs = problem(E=32, dtype=torch.bfloat16, hot=1, device=DEVICE)
    first, second = both(inputs, "adagrad")[0], both(inputs, "adagrad")[0]
    assert torch.equal(bits(first[0]), bits(second[0])) and torch.equal(first[1]["sum_sq"], second[1]["sum_sq"])
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_empty_changes_nothing():
    param, states, ids, weights, src_rows, src = problem(device=DEVICE)
    p, state, sq, dw = run("triton", param, states["adam"], ids[:0], weights[:0], src_rows[:0], src, "adam")
    assert torch.equal(p, param) and all(torch.equal(state[k], states["adam"][k]) for k in state)
    assert sq.item() == 0 and dw.shape == (0,)


def test_int32_ids_strided_table_fp32_moments_noncontiguous_src():
    """ids/src_rows int32, a (N, d) view of a wider bf16 buffer (its other half never written), fp32
    moments with a bf16 table, every other row of a wider src."""
    param, states, ids, weights, src_rows, src = problem(dtype=torch.bfloat16, device=DEVICE)
    N, d = param.shape
    buf = torch.cat([param, torch.randn(N, d, device=DEVICE).to(torch.bfloat16)], 1)
    other = buf[:, d:].clone()
    state = {k: v.float() for k, v in states["adam"].items()}
    ref = run("reference", param, state, ids, weights, src_rows, src, "adam")
    src2 = torch.stack([src, torch.full_like(src, float("nan"))], 1).view(-1, d)[::2]
    dw = torch.empty(ids.shape, device=DEVICE)
    sq = bag_update(buf[:, :d], state, ids.int(), weights, src_rows.int(), src2, "adam", lr=0.1, step=3, **HYPER,
                    impl="triton", weight_grad_out=dw)  # fmt: skip
    assert_close((buf[:, :d], state, sq, dw), ref, 1e-2)
    assert rel_err(state["exp_avg"], ref[1]["exp_avg"]) < 1e-5 and torch.equal(buf[:, d:], other)


def test_stochastic_rounding():
    check_stochastic_rounding("triton", DEVICE)
    off, exact = identical_rows("triton", torch.bfloat16, 3, False, DEVICE)
    if DEVICE == "cuda":
        assert torch.equal(off, exact.to(torch.bfloat16))  # off: round to nearest
    else:  # the interpreter truncates on store: still one of the two neighbours
        low, high = neighbours(exact)
        assert ((bits(off.float()) == low) | (bits(off.float()) == high)).all()


def test_triton_names_what_it_cannot_take():
    param, _, *rest = problem(device=DEVICE)
    with pytest.raises(ValueError, match="param has dtype torch.float64"):
        bag_update(param.double(), {}, *rest, "sgd", lr=0.1, impl="triton")
    with pytest.raises(ValueError, match="column stride"):
        bag_update(param.t().contiguous().t(), {}, *rest, "sgd", lr=0.1, impl="triton")
