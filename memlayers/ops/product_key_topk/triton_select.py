"""Fused Triton selection for exact product-key top-k.

Given the sub-key scores ``s1, s2`` (R rows, n) of R = tokens x heads rows, one kernel does per row:
top-k of ``s1`` and of ``s2``, the sums ``s1[i] + s2[j]`` of the grid cells that can win and their
top-k, and writes the flat key ids ``i*n + j`` best first. The scoring matmuls stay in torch (cuBLAS).

Order is exactly the reference's (``reference.py``): every stage sorts by (score descending, then
sub-key id or flat id ascending). Each score becomes an int64 key ``(order-preserving int32 bits of
the fp32 score) << 32 | (2**32 - 1 - id)``, so one ``tl.topk`` over the keys is a stable descending
selection. ``-0.0`` is turned into ``+0.0`` first (they tie, as in the reference); the half scores
are decoded back from their keys, so the grid adds the very floats the reference adds.

Grid ``(cdiv(R, ROWS),)``: a program owns ``ROWS`` rows. Row lengths are padded to powers of two:
``BLOCK_N = next_pow2(n)`` (pads load as ``-inf`` with positions >= n, below every real entry),
``KP = next_pow2(k)`` (only the first k results are stored) and ``CP = next_pow2(C)`` for the
C = sum_r floor(k / r) grid cells of ranks (a, b) with (a + 1)(b + 1) <= k
(``reference.grid_candidates``: no other cell can be in the top k), gathered from the two halves'
top-k with ``tl.gather``; pads get the smallest key. Sorting networks: ``tl.topk`` of
``(ROWS, BLOCK_N)`` twice and of ``(ROWS, CP)`` once (bitonic: sort blocks of KP, then halve by
pairwise max and re-merge), all unrolled. For n = 1024, k = 32 the last one sorts 128 keys instead
of the whole 1,024-cell grid: 13.8k instead of 18.5k SASS instructions per row (sm_90, one warp;
counted offline, not timed). ``TL_TOPK=False`` swaps in the same network written with ``tl.sum``
partners, which compiles to the same SASS and which the Triton interpreter runs ~100x faster (it
is what the CPU tests use).
"""

import functools

import torch
import triton
import triton.language as tl

from .reference import grid_candidates
from .reference import product_key_topk as product_key_topk_reference

LOW32 = tl.constexpr(0xFFFFFFFF)  # mask of the position field of a key


@triton.jit
def _keys(scores, payload):
    """int64 keys of fp32 ``scores``: order-preserving bits << 32 | ``payload`` (int64 in [0, 2**32))."""
    bits = (scores + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 -> +0.0
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | payload


@triton.jit
def _key_score(keys):
    """The fp32 score a key was made from (``-0.0`` comes back as ``+0.0``)."""
    bits = (keys >> 32).to(tl.int32)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(x):
    """Round fp32 to the nearest bf16 (ties to even), kept in fp32: a bf16 add, computed in fp32.

    Integer arithmetic on the bits, so the Triton interpreter (which truncates on casts) and GPUs agree.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 == 0xFFFF0000
    rounded = tl.where(x != x, bits, rounded)  # NaN stays NaN
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    """0, 1 along the j-th innermost of ``n_dims`` dims (size 2), 1 elsewhere: "is the right one of a pair"."""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    """One bitonic step along the i-th innermost pair dim of the hypercube ``h``.

    As ``tl.standard._compare_and_swap``, but the partner is ``pair sum - self`` (an int64 add reduction,
    wrapping) instead of ``self ^ pair xor``: one reduction over a size-2 dim either way on a GPU, and
    the Triton interpreter runs ``tl.sum`` in numpy but ``xor_sum`` element by element in Python.
    """
    partner = tl.sum(h, axis=n_dims - 1 - i, keep_dims=True) - h
    is_right = _indicator(n_dims, i)
    return tl.where((h > partner) != (flip ^ is_right), partner, h)


@triton.jit
def _bitonic_merge(h, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """order 0 ascending, 1 descending, 2 alternating between blocks of 2**stage."""
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_and_swap(h, flip, stage - 1 - i, n_dims)
    return h


@triton.jit
def _topk_rows(x, ROWS: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr, TL_TOPK: tl.constexpr):
    """The 2**LOG_K largest int64 keys of each row of ``x`` (ROWS, 2**LOG_N), in descending order.

    ``TL_TOPK``: Triton's own ``tl.topk``; otherwise the same bitonic top-k network (sort blocks of
    2**LOG_K, then halve by pairwise max and re-merge) written with ``_compare_and_swap`` above.
    """
    if LOG_K == 0:
        out = tl.max(x, axis=1, keep_dims=True)  # (tl.topk fails when it reduces to a single element)
    elif TL_TOPK:
        out = tl.topk(x, 2**LOG_K)
    else:
        n_dims: tl.constexpr = 1 + LOG_N  # the row dim, then LOG_N pair dims
        h = tl.reshape(x, [ROWS] + [2] * LOG_N)
        for i in tl.static_range(1, LOG_K + 1):
            h = _bitonic_merge(h, i, 2 if i < LOG_N else 1, n_dims)
        for i in tl.static_range(LOG_K + 1, LOG_N + 1):
            h = tl.max(h, axis=n_dims - (i - LOG_K) - LOG_K)
            h = _bitonic_merge(h, LOG_K, 2 if i < LOG_N else 1, n_dims - (i - LOG_K))
        out = tl.reshape(h, [ROWS, 2**LOG_K])
    return out


@triton.jit
def _product_key_select_kernel(
    s1_ptr,  # (T, H, n), strides (stride_1t, stride_1h, 1)
    s2_ptr,  # (T, H, n), strides (stride_2t, stride_2h, 1)
    out_ptr,  # (T, H, k) int64, contiguous
    cand_a_ptr,  # (C,) int32 grid ranks a of the candidate cells (``reference.grid_candidates``)
    cand_b_ptr,  # (C,) int32 their ranks b
    R,  # T * H rows
    H,
    n,
    k,
    C,
    stride_1t,
    stride_1h,
    stride_2t,
    stride_2h,
    ROWS: tl.constexpr,  # rows (t, h) per program
    LOG_N: tl.constexpr,  # BLOCK_N = 2**LOG_N >= n
    LOG_K: tl.constexpr,  # KP = 2**LOG_K >= k
    LOG_C: tl.constexpr,  # CP = 2**LOG_C >= C
    BF16_SUM: tl.constexpr,
    TL_TOPK: tl.constexpr,
):
    BLOCK_N: tl.constexpr = 2**LOG_N
    KP: tl.constexpr = 2**LOG_K
    low32 = tl.full((), LOW32, tl.int64)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # (ROWS,) = t * H + h
    row_ok = rows < R
    t = rows // H
    h = rows - t * H
    cols = tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (cols < n)[None, :]
    payload = low32 - cols.to(tl.int64)[None, :]  # (1, BLOCK_N): the lower position gets the larger key

    # Top KP of each half, best first (pads: -inf at positions >= n, below every real entry).
    x1 = tl.load(s1_ptr + (t * stride_1t + h * stride_1h)[:, None] + cols[None, :], mask=mask, other=float("-inf"))
    top1 = _topk_rows(_keys(x1.to(tl.float32), payload), ROWS, LOG_N, LOG_K, TL_TOPK)  # (ROWS, KP)
    x2 = tl.load(s2_ptr + (t * stride_2t + h * stride_2h)[:, None] + cols[None, :], mask=mask, other=float("-inf"))
    top2 = _topk_rows(_keys(x2.to(tl.float32), payload), ROWS, LOG_N, LOG_K, TL_TOPK)

    # The cells of the k x k grid that can win, (a + 1)(b + 1) <= k (pads: the smallest key).
    CP: tl.constexpr = 2**LOG_C
    c = tl.arange(0, CP)
    ca = tl.broadcast_to(tl.load(cand_a_ptr + c, mask=c < C, other=0)[None, :], (ROWS, CP))
    cb = tl.broadcast_to(tl.load(cand_b_ptr + c, mask=c < C, other=0)[None, :], (ROWS, CP))
    ka = tl.gather(top1, ca, axis=1)  # (ROWS, CP) keys of the candidates' halves
    kb = tl.gather(top2, cb, axis=1)
    sums = _key_score(ka) + _key_score(kb)
    if BF16_SUM:
        sums = _round_bf16(sums)
    flat = (low32 - (ka & low32)) * n + (low32 - (kb & low32))
    cand = tl.where((c < C)[None, :], _keys(sums, low32 - flat), -9223372036854775807 - 1)
    best = _topk_rows(cand, ROWS, LOG_C, LOG_K, TL_TOPK)  # (ROWS, KP)

    rank = tl.arange(0, KP)
    tl.store(
        out_ptr + rows[:, None] * k + rank[None, :],
        low32 - (best & low32),
        mask=row_ok[:, None] & (rank < k)[None, :],
    )


def select_config(n: int, k: int, device: torch.device) -> dict:
    """Rows per program, warps and sort network for ``n`` sub-keys and top ``k``.

    CUDA: one row (t, h) per program; ``benchmarks/kernels.py`` sweeps the alternatives on a real card.
    Interpreted (CPU): many rows per program, which numpy vectorises, and our sort network (the
    interpreter runs ``tl.topk``'s xor reductions element by element in Python).
    """
    if device.type != "cuda":
        return {"ROWS": 64, "num_warps": 1, "TL_TOPK": False}
    candidates = sum(k // r for r in range(1, k + 1))  # len(grid_candidates(k))
    elements = max(triton.next_power_of_2(n), triton.next_power_of_2(candidates))  # of the largest sort
    # About 32 int64 keys per thread: at n=1024, k=32 one warp measured fastest on an H200
    # (select kernel 2.61 ms vs 3.62 ms with 4 warps; benchmarks/RESULTS.md).
    return {"ROWS": 1, "num_warps": min(8, max(1, elements // 1024)), "TL_TOPK": True}


@functools.cache
def _candidates(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.grid_candidates(k)`` as int32 tensors on ``device`` (made once per k and device)."""
    return tuple(x.to(device=device, dtype=torch.int32) for x in grid_candidates(k))


def product_key_select_triton(s1: torch.Tensor, s2: torch.Tensor, k: int, config: dict | None = None) -> torch.Tensor:
    """s1, s2 (T, H, n) float32 or bfloat16 sub-key scores -> (T, H, k) int64 flat ids ``i*n + j``, best first.

    The same ids, in the same order, as the reference's three top-k passes (ties to the lower flat id;
    bfloat16: the grid sums are rounded to bfloat16, as the reference's bfloat16 grid is). Any strides
    with a unit last one are read in place. ``config``: overrides ``select_config``.
    """
    if s1.dim() != 3 or s1.shape != s2.shape or s1.dtype != s2.dtype:
        raise ValueError(
            "product_key_select_triton: s1 and s2 must be (T, H, n) of one dtype, "
            f"got {tuple(s1.shape)} {s1.dtype} and {tuple(s2.shape)} {s2.dtype}"
        )
    if s1.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"product_key_select_triton: scores must be float32 or bfloat16, got {s1.dtype}")
    T, H, n = s1.shape
    if not 1 <= k <= n:
        raise ValueError(f"product_key_select_triton: k={k} must be in [1, n={n}]")
    if n * n > LOW32.value:
        raise ValueError(f"product_key_select_triton: n={n} too large, flat ids i*n + j must fit in 32 bits")
    out = torch.empty(T, H, k, dtype=torch.int64, device=s1.device)
    if T * H == 0:
        return out
    s1 = s1 if s1.stride(-1) == 1 else s1.contiguous()
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    cfg = dict(config or select_config(n, k, s1.device))
    cand_a, cand_b = _candidates(k, s1.device)
    C = len(cand_a)
    _product_key_select_kernel[(triton.cdiv(T * H, cfg["ROWS"]),)](
        s1,
        s2,
        out,
        cand_a,
        cand_b,
        T * H,
        H,
        n,
        k,
        C,
        s1.stride(0),
        s1.stride(1),
        s2.stride(0),
        s2.stride(1),
        LOG_N=(n - 1).bit_length(),
        LOG_K=(k - 1).bit_length(),
        LOG_C=(C - 1).bit_length(),
        BF16_SUM=s1.dtype == torch.bfloat16,
        **cfg,
    )
    return out


def product_key_topk_triton(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int, config: dict | None = None
):
    """Exact top-k over all n*n product keys, per head: ``reference.product_key_topk`` with a fused selection.

    q1, q2 (T, H, h); keys1, keys2 (H, n, h) -> scores (T, H, k) best first, differentiable in queries and
    keys; indices (T, H, k) int64 flat ids ``i*n + j``; both equal to the reference's, element for
    element. Scores by einsum (cuBLAS), the three top-k passes in one Triton kernel, the k scores
    regathered in torch as the reference does, so autograd gives the backward. float32 and bfloat16
    scores use the kernel; others (float64, float16) go to the reference. Inputs are not validated here.
    """
    n = keys1.shape[1]
    s1 = torch.einsum("thd,hnd->thn", q1, keys1)  # (T, H, n)
    s2 = torch.einsum("thd,hnd->thn", q2, keys2)
    if s1.dtype not in (torch.float32, torch.bfloat16):
        return product_key_topk_reference(q1, q2, keys1, keys2, k)  # (scores again: rare dtypes only)
    with torch.no_grad():
        indices = product_key_select_triton(s1.detach(), s2.detach(), k, config)
    i = torch.div(indices, n, rounding_mode="floor")
    j = indices - i * n
    scores = s1.gather(-1, i) + s2.gather(-1, j)  # the reference's float sums, with autograd
    return scores, indices
