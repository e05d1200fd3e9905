"""Row-wise updates (``memlayers.ops.row_update``: Adam, row-wise Adagrad, SGD): the Triton kernels
against the torch references, and the references against the math written out.

Without a GPU the kernel runs on CPU under ``TRITON_INTERPRET=1``. The interpreter runs programs one
after another, so it checks indexing, masking and arithmetic, not races; it also truncates
fp32 -> bf16/fp16 on store (GPUs round to nearest), which the 1e-2 tolerance for 16-bit tables absorbs.
With a GPU (and TRITON_INTERPRET unset) the same tests run the compiled kernel on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import TOL, rel_err
from conftest import TRITON_DEVICE as DEVICE

from memlayers.ops.row_update import (
    row_adagrad_reference,
    row_adagrad_update,
    row_adam_reference,
    row_adam_update,
    row_sgd_reference,
    row_sgd_update,
)
from memlayers.ops.row_update.triton_kernel import row_update_config
from memlayers.optim import SparseRowAdagrad, SparseRowAdam, SparseRowSGD

HYPER = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN payloads included), for bit-identity checks."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def problem(N, d, U, dtype, moments=False, device=DEVICE):
    """param, exp_avg, exp_avg_sq (N, d); rows (U,) unique, unsorted; grads (U, d)."""
    p = torch.randn(N, d, device=device).to(dtype)
    m = (0.1 * torch.randn(N, d, device=device) if moments else torch.zeros(N, d, device=device)).to(dtype)
    v = (0.01 * torch.rand(N, d, device=device) if moments else torch.zeros(N, d, device=device)).to(dtype)
    rows = torch.randperm(N, device=device)[:U]
    grads = torch.randn(U, d, device=device).to(dtype)
    return p, m, v, rows, grads


def run_both(p, m, v, rows, grads, step, **hyper):
    """(kernel results, reference results), each (param, exp_avg, exp_avg_sq), on copies of the inputs."""
    hyper = {**HYPER, **hyper}
    k = [t.clone() for t in (p, m, v)]
    r = [t.clone() for t in (p, m, v)]
    row_adam_update(*k, rows, grads, **hyper, step=step, impl="triton")
    row_adam_reference(*r, rows.long(), grads, **hyper, step=step)
    return k, r


def untouched(N, rows):
    keep = torch.ones(N, dtype=torch.bool, device=rows.device)
    keep[rows] = False
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, U", [(1, 45), (37, 13), (100, 45), (1500, 3)])  # d=1500: two column blocks, tail masked
@pytest.mark.parametrize("step", [1, 5])  # 5: nonzero moments from earlier steps
def test_kernel_matches_reference(dtype, d, U, step):
    N = 64
    p, m, v, rows, grads = problem(N, d, U, dtype, moments=step > 1)
    (pk, mk, vk), (pr, mr, vr) = run_both(p, m, v, rows, grads, step)
    tol = TOL[dtype]
    assert rel_err(mk[rows], mr[rows]) < tol
    assert rel_err(vk[rows], vr[rows]) < tol
    assert rel_err(pk[rows], pr[rows]) < tol
    if dtype == torch.float32:  # the update itself, not just the (much larger) parameter
        assert rel_err(pk[rows] - p[rows], pr[rows] - p[rows]) < 1e-5
    keep = untouched(N, rows)
    for new, old in ((pk, p), (mk, m), (vk, v)):
        assert torch.equal(bits(new[keep]), bits(old[keep]))
    assert not torch.equal(pk[rows], p[rows])


def test_untouched_nan_rows_stay_poisoned():
    N, d, U = 50, 37, 20
    p, m, v, rows, grads = problem(N, d, U, torch.float32, moments=True)
    keep = untouched(N, rows)
    for t in (p, m, v):
        t[keep] = float("nan")
    before = [bits(t).clone() for t in (p, m, v)]
    row_adam_update(p, m, v, rows, grads, **HYPER, step=3, impl="triton")
    for t, b in zip((p, m, v), before):
        assert torch.equal(bits(t)[keep], b[keep])  # same NaN payloads: never written
        assert t[rows].isfinite().all()  # touched rows never read a poisoned one


def test_empty_rows_change_nothing():
    p, m, v, rows, grads = problem(10, 7, 0, torch.bfloat16)
    (pk, mk, vk), _ = run_both(p, m, v, rows, grads, step=1)
    assert torch.equal(pk, p) and torch.equal(mk, m) and torch.equal(vk, v)


def test_int32_rows_strided_table_and_fp32_moments():
    """A (N, d) view of a wider buffer (row stride 2d): the other half is never written."""
    N, d, U = 40, 37, 17
    buf = torch.randn(N, 2 * d, device=DEVICE).to(torch.bfloat16)
    p = buf[:, :d]
    m, v = 0.1 * torch.randn(N, d, device=DEVICE), 0.01 * torch.rand(N, d, device=DEVICE)  # fp32 moments
    rows = torch.randperm(N, device=DEVICE)[:U].int()
    grads = torch.randn(2 * U, d, device=DEVICE).to(torch.bfloat16)[::2]  # non-contiguous gradient
    other = buf[:, d:].clone()
    (pk, mk, vk), (pr, mr, vr) = run_both(p, m, v, rows, grads, step=2)
    assert rel_err(pk, pr) < 1e-2 and rel_err(mk, mr) < 1e-5 and rel_err(vk, vr) < 1e-5
    row_adam_update(p, m, v, rows, grads, **HYPER, step=2, impl="triton")
    assert torch.equal(buf[:, d:], other) and torch.equal(p, pk)


def run_rule(rule, impl, p, sum_sq, rows, grads, lr=0.1, eps=1e-8):
    """Copies of (param, sum_sq) after one Adagrad or SGD update through ``impl``."""
    p, sum_sq = p.clone(), sum_sq.clone()
    if rule == "adagrad":
        if impl == "reference":
            row_adagrad_reference(p, sum_sq, rows.long(), grads, lr, eps)
        else:
            row_adagrad_update(p, sum_sq, rows, grads, lr, eps, impl=impl)
    elif impl == "reference":
        row_sgd_reference(p, rows.long(), grads, lr)
    else:
        row_sgd_update(p, rows, grads, lr, impl=impl)
    return p, sum_sq


@pytest.mark.parametrize("rule", ["adagrad", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, U", [(1, 45), (37, 13), (100, 45), (2500, 3)])  # d=2500: three column blocks
def test_adagrad_and_sgd_kernels_match_reference(rule, dtype, d, U):
    N = 64
    p, _, _, rows, grads = problem(N, d, U, dtype)
    sum_sq = torch.rand(N, device=DEVICE)  # earlier steps' accumulators
    keep = untouched(N, rows)
    p[keep], sum_sq[keep] = float("nan"), float("nan")  # never read, never written
    before_p, before_s = bits(p).clone(), bits(sum_sq).clone()
    pk, sk = run_rule(rule, "triton", p, sum_sq, rows, grads)
    pr, sr = run_rule(rule, "reference", p, sum_sq, rows, grads)
    tol = TOL[dtype]
    assert rel_err(pk[rows], pr[rows]) < tol
    if dtype == torch.float32:
        assert rel_err(pk[rows] - p[rows], pr[rows] - p[rows]) < 1e-5
    assert rel_err(sk[rows], sr[rows]) < 1e-5
    assert torch.equal(bits(pk)[keep], before_p[keep]) and torch.equal(bits(sk)[keep], before_s[keep])
    assert not torch.equal(pk[rows], p[rows])


def test_adagrad_and_sgd_references_match_the_math():
    N, d, U = 20, 6, 7
    p, _, _, rows, grads = problem(N, d, U, torch.float32, device="cpu")
    s0 = torch.rand(N)
    lr, eps = 0.3, 1e-6
    pa, sa = run_rule("adagrad", "reference", p, s0, rows, grads, lr, eps)
    ps, _ = run_rule("sgd", "reference", p, s0, rows, grads, lr)
    for i, r in enumerate(rows.tolist()):
        g = grads[i].double()
        s = s0[r].double() + (g * g).sum() / d
        assert torch.allclose(sa[r].double(), s, rtol=1e-6)
        assert torch.allclose(pa[r].double(), p[r].double() - lr * g / (s.sqrt() + eps), rtol=1e-6, atol=1e-7)
        assert torch.allclose(ps[r].double(), p[r].double() - lr * g, rtol=1e-6, atol=1e-7)
    keep = untouched(N, rows)
    assert torch.equal(pa[keep], p[keep]) and torch.equal(sa[keep], s0[keep]) and torch.equal(ps[keep], p[keep])


@pytest.mark.parametrize("rule", ["adagrad", "sgd"])
def test_adagrad_and_sgd_empty_and_strided(rule):
    p, _, _, rows, grads = problem(10, 7, 0, torch.bfloat16)
    s = torch.zeros(10, device=DEVICE)
    pk, sk = run_rule(rule, "triton", p, s, rows, grads)
    assert torch.equal(pk, p) and torch.equal(sk, s)
    N, d, U = 40, 37, 17
    buf = torch.randn(N, 2 * d, device=DEVICE)
    other = buf[:, d:].clone()
    rows = torch.randperm(N, device=DEVICE)[:U].int()
    grads = torch.randn(2 * U, d, device=DEVICE)[::2]
    pr, sr = run_rule(rule, "reference", buf[:, :d], s.new_zeros(N), rows, grads)
    if rule == "adagrad":
        sum_sq = s.new_zeros(N)
        row_adagrad_update(buf[:, :d], sum_sq, rows, grads, 0.1, 1e-8, impl="triton")
        assert rel_err(sum_sq, sr) < 1e-5
    else:
        row_sgd_update(buf[:, :d], rows, grads, 0.1, impl="triton")
    assert rel_err(buf[:, :d], pr) < 1e-5 and torch.equal(buf[:, d:], other)


def test_default_config_tiles():
    assert row_update_config(1024) == {"BLOCK_U": 2, "BLOCK_D": 1024, "num_warps": 4}
    assert row_update_config(37)["BLOCK_D"] == 64 and row_update_config(1)["BLOCK_U"] == 2048
    assert row_update_config(5000)["BLOCK_D"] == 1024


OPTIMIZERS = {
    "adam": lambda params, impl: SparseRowAdam(params, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, impl=impl),
    "adagrad": lambda params, impl: SparseRowAdagrad(params, lr=1e-1, eps=1e-6, impl=impl),
    "sgd": lambda params, impl: SparseRowSGD(params, lr=1e-1, impl=impl),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_row_optimizer_kernel_equals_reference_path(name, dtype):
    N, d = 30, 19
    a = torch.nn.Parameter(torch.randn(N, d, device=DEVICE).to(dtype))
    b = torch.nn.Parameter(a.detach().clone())
    ours, ref = OPTIMIZERS[name]([a], "triton"), OPTIMIZERS[name]([b], "reference")
    for _ in range(4):
        rows = torch.randint(0, N, (25,), device=DEVICE)  # repeated: coalesce sums them
        vals = torch.randn(25, d, device=DEVICE).to(dtype)
        grad = torch.sparse_coo_tensor(rows[None], vals, (N, d), check_invariants=True)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert rel_err(a.detach(), b.detach()) < TOL[dtype]
    for key in ours.STATE:
        assert rel_err(ours.state[a][key], ref.state[b][key]) < TOL[dtype]
    with pytest.raises(ValueError, match="impl must be one of"):
        OPTIMIZERS[name]([a], "fused")


def test_bad_inputs_raise(monkeypatch):
    p, m, v, rows, grads = problem(10, 4, 3, torch.float32, device="cpu")
    h = dict(HYPER, step=1)
    with pytest.raises(ValueError, match="impl must be one of"):
        row_adam_update(p, m, v, rows, grads, **h, impl="cuda")
    with pytest.raises(ValueError, match="param must be a 2-D"):
        row_adam_update(p[0], m, v, rows, grads, **h)
    with pytest.raises(ValueError, match="exp_avg shape"):
        row_adam_update(p, m[:5], v, rows, grads, **h)
    with pytest.raises(TypeError, match="exp_avg_sq must be floating"):
        row_adam_update(p, m, v.long(), rows, grads, **h)
    with pytest.raises(TypeError, match="rows must be int64 or int32"):
        row_adam_update(p, m, v, rows.float(), grads, **h)
    with pytest.raises(ValueError, match="rows must be 1-D"):
        row_adam_update(p, m, v, rows[None], grads, **h)
    with pytest.raises(ValueError, match=r"grads must be \(U, d\)"):
        row_adam_update(p, m, v, rows, grads[:, :2], **h)
    with pytest.raises(ValueError, match="one device"):
        row_adam_update(p, m, v, rows, grads.to("meta"), **h)
    with pytest.raises(ValueError, match="betas in"):
        row_adam_update(p, m, v, rows, grads, **dict(h, beta2=1.0))
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        row_adam_update(p, m, v, rows, grads, **dict(h, step=0))
    # what the kernel cannot take: tensors where it runs (CUDA, or CPU under the interpreter)
    pk, mk, vk, rk, gk = problem(10, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="the kernel takes float32, bfloat16 and float16"):
        row_adam_update(pk.double(), mk.double(), vk.double(), rk, gk.double(), **h, impl="triton")
    with pytest.raises(ValueError, match="unit column stride"):
        row_adam_update(pk.t().contiguous().t(), mk, vk, rk, gk, **h, impl="triton")
    row_adam_update(p.double(), m.double(), v.double(), rows, grads.double(), **h)  # auto: the reference takes fp64
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        row_adam_update(p, m, v, rows, grads, **h, impl="triton")


def test_adagrad_and_sgd_bad_inputs_raise():
    p, _, _, rows, grads = problem(10, 4, 3, torch.float32, device="cpu")
    s = torch.zeros(10)
    with pytest.raises(ValueError, match=r"sum_sq shape \(10, 4\) must be \(10,\)"):
        row_adagrad_update(p, torch.zeros(10, 4), rows, grads, 0.1, 1e-8)
    with pytest.raises(ValueError, match="need eps > 0"):
        row_adagrad_update(p, s, rows, grads, 0.1, 0.0)
    with pytest.raises(ValueError, match="need lr >= 0"):
        row_sgd_update(p, rows, grads, -1.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        row_sgd_update(p, rows, grads, 0.1, impl="fast")
    with pytest.raises(ValueError, match="one device"):
        row_adagrad_update(p, s.to("meta"), rows, grads, 0.1, 1e-8)
    with pytest.raises(TypeError, match="rows must be int64 or int32"):
        row_sgd_update(p, rows.float(), grads, 0.1)
    pk, _, _, rk, gk = problem(10, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="needs a contiguous accumulator"):
        row_adagrad_update(pk, torch.zeros(20, device=pk.device)[::2], rk, gk, 0.1, 1e-8, impl="triton")
    row_adagrad_update(pk, torch.zeros(20, device=pk.device)[::2], rk, gk, 0.1, 1e-8)  # auto: the reference


@pytest.mark.skipif(DEVICE != "cuda", reason="N * d > 2**31 needs ~13 GB of GPU memory")
def test_int64_offsets_on_gpu():
    N, d = (1 << 21) + 8, 1024  # N * d > 2**31 elements per tensor
    p, m, v = (torch.zeros(N, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = torch.tensor([N - 1, 5, N - 3], device="cuda")
    grads = torch.randn(3, d, device="cuda", dtype=torch.bfloat16)
    row_adam_update(p, m, v, rows, grads, **HYPER, step=1, impl="triton")
    expect = -HYPER["lr"] * grads.float().sign()  # first step: |update| = lr (eps aside)
    assert rel_err(p[rows], expect) < 1e-2
    assert p[N - 2].eq(0).all() and p[:5].eq(0).all() and p[6 : N - 3].eq(0).all()
