"""Triton row-wise optimizer updates: the functions of ``reference.py``, each in one kernel.

Every kernel reads each touched element once and writes it once, with no temporaries in memory;
rows not in ``rows`` are never touched. Any ``d`` works (the column tail is masked); row offsets
are int64, so ``N * d`` may exceed 2**31.

* Adam and SGD: grid ``(cdiv(U, BLOCK_U), cdiv(d, BLOCK_D))``; a program owns ``BLOCK_U``
  consecutive entries of ``rows`` and one column block: it loads their row ids, then the
  ``(BLOCK_U, BLOCK_D)`` tiles of the gradient (and moments) and the parameter, computes in fp32
  and stores. Adam moves 14 bytes per element in bf16 (g, m, v, p read; m, v, p written).
* Row-wise Adagrad: grid ``(cdiv(U, BLOCK_U),)``; a program owns whole rows, since the update
  needs the row's mean squared gradient first: one sweep over the columns sums ``g * g``, a
  second reads ``g`` again (from cache) with ``p`` and stores ``p``.
"""

import torch
import triton
import triton.language as tl

from .reference import adam_step_size

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def adam_math(p, m, v, g, step_size, beta2, one_minus_beta1, one_minus_beta2, eps):
    """One Adam step on fp32 tiles (``reference.row_adam_reference``'s math): the new (p, m, v)."""
    # torch.lerp's two-sided formula (weight >= 0.5 keeps beta1 = 0 exact: m = g)
    diff = g - m
    m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * diff, g - diff * (1.0 - one_minus_beta1))
    v = v * beta2 + one_minus_beta2 * g * g
    return p - step_size * tl.div_rn(m, tl.sqrt_rn(v) + eps), m, v


@triton.jit
def adagrad_math(s, row_mean_sq, lr, eps):
    """Row-wise Adagrad's accumulator step in fp32 (``reference.row_adagrad_reference``'s math): (R,) old
    accumulators and the rows' mean g**2 over all d columns -> (new accumulators, the rows' step size
    scale: p -= scale * g)."""
    s = s + row_mean_sq
    return s, lr / (tl.sqrt_rn(s) + eps)


@triton.jit
def stochastic_round_bf16(x, seed, counters):
    """fp32 tile x (R, C) -> fp32 values exactly representable in bf16, rounded stochastically.

    16 uniform random bits are added below bf16's mantissa, then the low 16 bits are dropped, so x goes
    to its bf16 neighbour away from zero with probability equal to the dropped fraction of an ulp, else
    to the one towards zero (unbiased); NaN stays NaN. counters (R, C // 8), unique per 8 elements: one
    Philox call gives 4 x 32 random bits, the bits of 8 consecutive elements.
    """
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    words = tl.interleave(tl.interleave(r0, r1), tl.interleave(r2, r3)).to(tl.uint32, bitcast=True)
    noise = tl.interleave(words & 0xFFFF, words >> 16)
    bits = (x.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # noqa: PLR0124 (x != x: NaN)


@triton.jit
def _row_tile(rows_ptr, grads_ptr, U, D, stride_g, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of entries x columns: row ids (BLOCK_U,) int64, column offsets (BLOCK_D,),
    the in-bounds mask and the fp32 gradient tile (BLOCK_U, BLOCK_D)."""
    offs_u = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_u = offs_u < U
    mask = mask_u[:, None] & (offs_d < D)[None, :]
    r = tl.load(rows_ptr + offs_u, mask=mask_u, other=0).to(tl.int64)
    g = tl.load(grads_ptr + offs_u[:, None] * stride_g + offs_d[None, :], mask=mask, other=0).to(tl.float32)
    return r, offs_d, mask, g


@triton.jit
def _row_adam_kernel(
    param_ptr,  # (N, d), row stride `stride_p`, unit column stride
    exp_avg_ptr,  # (N, d), row stride `stride_m`
    exp_avg_sq_ptr,  # (N, d), row stride `stride_v`
    rows_ptr,  # (U,) int32/int64, unique
    grads_ptr,  # (U, d), row stride `stride_g`
    U,
    D,
    stride_p,
    stride_m,
    stride_v,
    stride_g,
    step_size,  # lr * sqrt(1 - beta2**t) / (1 - beta1**t)
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    BLOCK_U: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r, offs_d, mask, g = _row_tile(rows_ptr, grads_ptr, U, D, stride_g, BLOCK_U, BLOCK_D)
    p_ptrs = param_ptr + r[:, None] * stride_p + offs_d[None, :]
    m_ptrs = exp_avg_ptr + r[:, None] * stride_m + offs_d[None, :]
    v_ptrs = exp_avg_sq_ptr + r[:, None] * stride_v + offs_d[None, :]
    m = tl.load(m_ptrs, mask=mask, other=0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0).to(tl.float32)
    p = tl.load(p_ptrs, mask=mask, other=0).to(tl.float32)
    p, m, v = adam_math(p, m, v, g, step_size, beta2, one_minus_beta1, one_minus_beta2, eps)
    tl.store(m_ptrs, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptrs, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptrs, p.to(param_ptr.dtype.element_ty), mask=mask)


def row_update_config(d: int) -> dict:
    """Tile sizes and warps (for all three kernels) for rows of width ``d``: tiles of about 2048 elements, 4 warps
    (16 elements of each of g, m, v, p per thread; a 1024-wide bf16 row is one 2 KiB tile row)."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 1024)
    return {"BLOCK_U": max(1, 2048 // block_d), "BLOCK_D": block_d, "num_warps": 4}


def row_adam_triton(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    config: dict | None = None,
) -> None:
    """In-place Adam on ``rows`` of param/exp_avg/exp_avg_sq (N, d), gradient grads (U, d).

    The (N, d) tensors need a unit column stride (any row stride); ``rows`` must be unique and in
    [0, N) (not checked: duplicates race, out-of-range ids write out of bounds). ``config``
    overrides ``row_update_config(d)`` (BLOCK_U, BLOCK_D, num_warps).
    """
    U, d = grads.shape
    if U == 0 or d == 0:
        return
    grads = grads if grads.stride(1) == 1 else grads.contiguous()
    cfg = dict(config or row_update_config(d))
    grid = (triton.cdiv(U, cfg["BLOCK_U"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _row_adam_kernel[grid](
        param,
        exp_avg,
        exp_avg_sq,
        rows.contiguous(),
        grads,
        U,
        d,
        param.stride(0),
        exp_avg.stride(0),
        exp_avg_sq.stride(0),
        grads.stride(0),
        float(adam_step_size(lr, beta1, beta2, step)),  # scalars go in as fp32
        float(beta2),
        float(1 - beta1),
        float(1 - beta2),
        float(eps),
        **cfg,
    )


@triton.jit
def _row_adagrad_kernel(
    param_ptr,  # (N, d), row stride `stride_p`, unit column stride
    sum_sq_ptr,  # (N,) contiguous
    rows_ptr,  # (U,) int32/int64, unique
    grads_ptr,  # (U, d), row stride `stride_g`
    U,
    D,
    stride_p,
    stride_g,
    lr,
    eps,
    BLOCK_U: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_u = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
    mask_u = offs_u < U
    r = tl.load(rows_ptr + offs_u, mask=mask_u, other=0).to(tl.int64)
    sq = tl.zeros((BLOCK_U, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_u[:, None] & (offs_d < D)[None, :]
        g = tl.load(grads_ptr + offs_u[:, None] * stride_g + offs_d[None, :], mask=mask, other=0).to(tl.float32)
        sq += g * g
    s = tl.load(sum_sq_ptr + r, mask=mask_u, other=0).to(tl.float32)
    s, scale = adagrad_math(s, tl.sum(sq, axis=1) / D, lr, eps)
    tl.store(sum_sq_ptr + r, s.to(sum_sq_ptr.dtype.element_ty), mask=mask_u)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_u[:, None] & (offs_d < D)[None, :]
        g = tl.load(grads_ptr + offs_u[:, None] * stride_g + offs_d[None, :], mask=mask, other=0).to(tl.float32)
        p_ptrs = param_ptr + r[:, None] * stride_p + offs_d[None, :]
        p = tl.load(p_ptrs, mask=mask, other=0).to(tl.float32) - scale[:, None] * g
        tl.store(p_ptrs, p.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_sgd_kernel(
    param_ptr,  # (N, d), row stride `stride_p`, unit column stride
    rows_ptr,  # (U,) int32/int64, unique
    grads_ptr,  # (U, d), row stride `stride_g`
    U,
    D,
    stride_p,
    stride_g,
    lr,
    BLOCK_U: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r, offs_d, mask, g = _row_tile(rows_ptr, grads_ptr, U, D, stride_g, BLOCK_U, BLOCK_D)
    p_ptrs = param_ptr + r[:, None] * stride_p + offs_d[None, :]
    p = tl.load(p_ptrs, mask=mask, other=0).to(tl.float32) - lr * g
    tl.store(p_ptrs, p.to(param_ptr.dtype.element_ty), mask=mask)


def row_adagrad_triton(param, sum_sq, rows, grads, lr: float, eps: float, config: dict | None = None) -> None:
    """In-place row-wise Adagrad on ``rows`` of param (N, d) and sum_sq (N,), gradient grads (U, d).

    Same contract as ``row_adam_triton`` (unit column stride, unique in-range rows; ``sum_sq``
    contiguous). ``config`` overrides ``row_update_config(d)``.
    """
    U, d = grads.shape
    if U == 0 or d == 0:
        return
    grads = grads if grads.stride(1) == 1 else grads.contiguous()
    cfg = dict(config or row_update_config(d))
    _row_adagrad_kernel[(triton.cdiv(U, cfg["BLOCK_U"]),)](
        param, sum_sq, rows.contiguous(), grads, U, d, param.stride(0), grads.stride(0), float(lr), float(eps), **cfg
    )


def row_sgd_triton(param, rows, grads, lr: float, config: dict | None = None) -> None:
    """In-place SGD on ``rows`` of param (N, d), gradient grads (U, d); contract as ``row_adam_triton``."""
    U, d = grads.shape
    if U == 0 or d == 0:
        return
    grads = grads if grads.stride(1) == 1 else grads.contiguous()
    cfg = dict(config or row_update_config(d))
    grid = (triton.cdiv(U, cfg["BLOCK_U"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _row_sgd_kernel[grid](param, rows.contiguous(), grads, U, d, param.stride(0), grads.stride(0), float(lr), **cfg)
