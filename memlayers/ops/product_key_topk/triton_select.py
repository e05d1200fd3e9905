"""Fused Triton selection for exact product-key top-k.

Given the sub-key scores ``s1, s2`` (R rows, n) of R = tokens x heads rows, one kernel does per row:
top-k of ``s1`` and of ``s2``, the sums ``s1[i] + s2[j]`` of the grid cells that can win and their
top-k, and writes the flat key ids ``i*n + j`` best first. The scoring matmuls stay in torch (cuBLAS);
the backward is ``backward.py``.

Order is exactly the reference's (``reference.py``): every stage ranks by (score descending, then
sub-key id or flat id ascending). A score's int32 *order bits* (its fp32 bits, negatives flipped, so
that int order is float order; ``-0.0`` first turned into ``+0.0``: they tie, as in the reference)
make the int64 key ``bits << 32 | (2**32 - 1 - id)``, so one descending top-k over the keys is a
stable selection. The half scores are decoded back from their keys, so the grid adds the very
floats the reference adds.

Each stage filters, then sorts a few keys (``FILTER``; otherwise whole rows are sorted, as before):

* a threshold: a lower bound ``lo`` of the k-th largest (32-bit order bits in the halves, 64-bit keys
  in the grid) with at least k entries >= ``lo`` (the smallest of k disjoint strided groups' maxima;
  in the grid the smallest of row a = 0's k cells); while more than CAP = 2 KP entries are >= ``lo``,
  ``lo`` is raised by bisection on the bits, keeping at least k (on random scores at n = 1024, k = 32:
  1.7 steps per half, 1.8 in the grid, about 46 entries left). In a half, when ``lo`` ends at the
  k-th value with more than CAP ties, the ties kept are those below a position bisected for too
  (the tie rule keeps the lowest ids).
* compaction: the prefix sum of the kept flags goes to a scratch row, and each of the CAP slots finds
  its entry by a binary search there (a gather: Triton lowers a scatter to computed slots, and the
  prefix sum feeding it, in a far costlier layout), reading the entry's score back.
* a bitonic top-KP of the CAP keys.

The grid: the C = sum_r floor(k / r) cells of ranks (a, b) with (a + 1)(b + 1) <= k
(``reference.grid_candidates``: no other cell can be in the top k) read their halves' keys back from
the top lists stored in the scratch (a gather through memory: ``tl.gather`` does not lower on Triton
3.6 for every layout, e.g. with more than one warp).

Launch: a persistent ``min(cdiv(R, ROWS), MAX_PROGRAMS)`` programs, each owning ``ROWS`` rows at a time
and one scratch row each (``_scratch``). Sizes are padded to powers of two (``kernel_constexprs``): the
row 2**LOG_N >= n (pads get the smallest key), the top lists KP = 2**LOG_K >= k (only the first k
results are stored), the grid 2**LOG_C >= C. ``TL_TOPK`` uses Triton's ``tl.topk`` for the sorting
networks; otherwise the same bitonic network written with ``tl.sum`` partners, which compiles to the
same SASS and which the Triton interpreter runs ~100x faster (it is what the CPU tests use).

Offline (``benchmarks/compile_check.py``, sm_90, one warp, n = 1024, k = 32, fp32): about 3.8k SASS
instructions per row on the common path (the loops at their mean trip counts on random scores),
against 13.8k for the whole-row sorts before; counted, not timed.
"""

import functools

import torch
import triton
import triton.language as tl

from . import library, triton_unsupported
from .backward import selected_scores
from .reference import grid_candidates
from .reference import product_key_topk as product_key_topk_reference

LOW32 = tl.constexpr(0xFFFFFFFF)  # mask of the position field of a key
INT32_MIN = tl.constexpr(-(2**31))
INT64_MIN = tl.constexpr(-(2**63))
MAX_PROGRAMS = 4096  # persistent programs at most (several times what an H100/H200 holds at once): bounds the scratch


@triton.jit
def _order_bits(scores):
    """int32 with the order of fp32 ``scores`` (``-0.0`` as ``+0.0``)."""
    bits = (scores + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 -> +0.0
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _keys(scores, payload):
    """int64 keys of fp32 ``scores``: order bits << 32 | ``payload`` (int64 in [0, 2**32))."""
    return (_order_bits(scores).to(tl.int64) << 32) | payload


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
    if TL_TOPK:
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
def _count_at_least(x, t):
    """(ROWS,) int32: entries of each row of ``x`` (ROWS, B) that are >= ``t`` (ROWS,)."""
    return tl.sum((x >= t[:, None]).to(tl.int32), axis=1)


@triton.jit
def _raise_bound(x, lo, hi, count, k, CAP: tl.constexpr):
    """Bisect on the values of ``x`` (ROWS, B) int32 or int64 until at most ``CAP`` entries are >= ``lo``.

    Given k <= count = count(x >= lo) and the k-th largest x <= hi (all (ROWS,)), returns (lo, count) with
    the same invariants and count <= CAP, or with lo the k-th largest (ties at it can keep count above
    CAP). Rows that are done may still move, within the invariants.
    """
    while tl.max(((count > CAP) & (lo < hi)).to(tl.int32), axis=0) > 0:
        mid = (lo | hi) - ((lo ^ hi) >> 1)  # ceil((lo + hi) / 2) without overflow: lo < mid <= hi
        c = _count_at_least(x, mid)
        up = c >= k
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
        count = tl.where(up, c, count)
    return lo, count


@triton.jit
def _kept_positions(keep, prefix_buf, ROWS: tl.constexpr, LOG_B: tl.constexpr, LOG_CAP: tl.constexpr):
    """(ROWS, 2**LOG_CAP) int32: the positions of the first 2**LOG_CAP entries where ``keep`` (ROWS, 2**LOG_B),
    in order (2**LOG_B past the last one).

    The inclusive prefix sum of ``keep`` goes to ``prefix_buf`` (ROWS,) (2**LOG_B int32 per row) and each
    slot s finds the first position whose prefix sum exceeds s by a binary search there: a gather, where
    scattering each entry to its slot would need a layout Triton lowers far less efficiently.
    """
    B: tl.constexpr = 2**LOG_B
    tl.store(prefix_buf[:, None] + tl.arange(0, B)[None, :], tl.cumsum(keep.to(tl.int32), axis=1))
    tl.debug_barrier()
    slot = tl.arange(0, 2**LOG_CAP)[None, :]
    pos = tl.zeros((ROWS, 2**LOG_CAP), tl.int32)  # positions whose prefix sum is <= slot: the answer
    for i in range(LOG_B):  # a loop, not unrolled: a chain of unrolled loads slows Triton's compiler ~4x
        step = 1 << (LOG_B - 1 - i)
        pos = tl.where(tl.load(prefix_buf[:, None] + pos + (step - 1)) <= slot, pos + step, pos)
    return pos


@triton.jit
def _row_keys(bits):
    """int64 keys of order ``bits`` (ROWS, B) int32 whose ids are their positions."""
    cols = tl.arange(0, bits.shape[1]).to(tl.int64)
    return (bits.to(tl.int64) << 32) | (tl.full((), LOW32, tl.int64) - cols)[None, :]


@triton.jit
def _row_keys_at(bits, pos):
    """int64 keys of order ``bits`` whose ids are ``pos`` (both (ROWS, B) int32)."""
    return (bits.to(tl.int64) << 32) | (tl.full((), LOW32, tl.int64) - pos.to(tl.int64))


@triton.jit
def _load_bits(s_ptr, offsets, row_ok, pos, n):
    """Order bits of the scores at positions ``pos`` (ROWS, B) of each row (pads at positions >= n: the smallest)."""
    x = tl.load(s_ptr + offsets[:, None] + pos, mask=row_ok[:, None] & (pos < n))
    return tl.where(pos < n, _order_bits(x.to(tl.float32)), INT32_MIN)


@triton.jit
def _keep_lowest_ties(bits, lo, count, cols, k, CAP: tl.constexpr):
    """(keep, count): the entries of ``bits`` (ROWS, B) above ``lo`` (ROWS,), the k-th largest with more
    than ``CAP`` ties, and the ties at positions ``cols`` below j, the least j keeping at least k (bisected)."""
    lo = lo[:, None]
    j_lo = tl.zeros_like(count)
    j_hi = tl.full(count.shape, bits.shape[1], tl.int32)
    while tl.max((count > CAP).to(tl.int32), axis=0) > 0:
        mid = (j_lo + j_hi) >> 1
        c = tl.sum(((bits > lo) | ((bits == lo) & (cols < mid[:, None]))).to(tl.int32), axis=1)
        up = c >= k
        j_lo = tl.where(up, j_lo, mid)
        j_hi = tl.where(up, mid, j_hi)
        count = tl.where(up, c, count)
    return (bits > lo) | ((bits == lo) & (cols < j_hi[:, None])), count


@triton.jit
def _half_top(
    s_ptr,
    offsets,  # (ROWS,) int64 row starts
    row_ok,  # (ROWS,)
    prefix_buf,  # (ROWS,) pointers to each row's int32 scratch
    n,
    k,
    ROWS: tl.constexpr,
    LOG_N: tl.constexpr,
    LOG_K: tl.constexpr,
    LOG_CAP: tl.constexpr,
    TL_TOPK: tl.constexpr,
):
    """(ROWS, 2**LOG_K) int64 keys of each row's top sub-key scores, best first (see the module docstring)."""
    BLOCK_N: tl.constexpr = 2**LOG_N
    KP: tl.constexpr = 2**LOG_K
    CAP: tl.constexpr = 2**LOG_CAP
    cols = tl.arange(0, BLOCK_N)[None, :]
    bits = _load_bits(s_ptr, offsets, row_ok, cols, n)
    if LOG_CAP >= LOG_N:
        top = _topk_rows(_row_keys(bits), ROWS, LOG_N, LOG_K, TL_TOPK)
    else:
        # Each strided group j = g (mod KP), g < k, holds a real entry: at least k entries are >= lo.
        group_max = tl.max(tl.reshape(bits, [ROWS, BLOCK_N // KP, KP]), axis=1)  # (ROWS, KP)
        lo = tl.min(tl.where((tl.arange(0, KP) < k)[None, :], group_max, 2**31 - 1), axis=1)
        # lo again (lo <= max), as a reduction over the row's layout: no layout conversion in the loops
        lo = tl.max(tl.minimum(bits, lo[:, None]), axis=1)
        lo, count = _raise_bound(bits, lo, tl.max(bits, axis=1), _count_at_least(bits, lo), k, CAP)
        if tl.max((count > CAP).to(tl.int32), axis=0) > 0:  # rare: more ties at lo than fit
            keep, count = _keep_lowest_ties(bits, lo, count, cols, k, CAP)
        else:
            keep = bits >= lo[:, None]
        pos = _kept_positions(keep, prefix_buf, ROWS, LOG_N, LOG_CAP)  # (ROWS, CAP)
        slot = tl.arange(0, CAP)[None, :]
        cand = tl.where(slot < count[:, None], _row_keys_at(_load_bits(s_ptr, offsets, row_ok, pos, n), pos), INT64_MIN)
        top = _topk_rows(cand, ROWS, LOG_CAP, LOG_K, TL_TOPK)
    return top


@triton.jit(do_not_specialize=["R", "H", "C"])  # counts: one compiled kernel whether or not they are 1
def _product_key_select_kernel(
    s1_ptr,  # (T, H, n), strides (stride_1t, stride_1h, 1)
    s2_ptr,  # (T, H, n), strides (stride_2t, stride_2h, 1)
    out_ptr,  # (T, H, k) int64, contiguous
    cand_a_ptr,  # (C,) int32 grid ranks a of the candidate cells (``reference.grid_candidates``)
    cand_b_ptr,  # (C,) int32 their ranks b
    prefix_ptr,  # (programs * ROWS, max(BLOCK_N, CP)) int32 scratch
    keys_ptr,  # (programs * ROWS, 2 * KP + CP) int64 scratch
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
    LOG_CAP: tl.constexpr,  # CAP = 2**LOG_CAP >= KP: filtered candidates per stage (>= LOG_N / LOG_C: no filter)
    BF16_SUM: tl.constexpr,
    TL_TOPK: tl.constexpr,
):
    KP: tl.constexpr = 2**LOG_K
    CP: tl.constexpr = 2**LOG_C
    CAP: tl.constexpr = 2**LOG_CAP
    low32 = tl.full((), LOW32, tl.int64)
    r = tl.arange(0, ROWS)
    slot = (tl.program_id(0) * ROWS + r).to(tl.int64)  # (ROWS,) this program's scratch rows
    prefix_buf = prefix_ptr + slot * max(2**LOG_N, CP)
    top1_buf = keys_ptr + slot * (2 * KP + CP)
    top2_buf = top1_buf + KP
    cand_buf = top2_buf + KP
    c = tl.arange(0, CP)
    rank = tl.arange(0, KP)[None, :]
    for block in range(tl.program_id(0), tl.cdiv(R, ROWS), tl.num_programs(0)):
        rows = (block * ROWS + r).to(tl.int64)  # (ROWS,) = t * H + h
        row_ok = rows < R
        t = rows // H
        h = rows - t * H
        for half in range(2):  # a loop, not two inlined copies: half the code to compile
            if half == 0:
                s_ptr = s1_ptr
                offsets = t * stride_1t + h * stride_1h
            else:
                s_ptr = s2_ptr
                offsets = t * stride_2t + h * stride_2h
            tl.debug_barrier()  # the previous rows and half are done with the scratch
            top = _half_top(s_ptr, offsets, row_ok, prefix_buf, n, k, ROWS, LOG_N, LOG_K, LOG_CAP, TL_TOPK)
            tl.store(top1_buf[:, None] + half * KP + rank, top)
        tl.debug_barrier()
        # The cells of the k x k grid that can win, (a + 1)(b + 1) <= k (pads: the smallest key). Their
        # ranks are read per row: registers held across the row loop get spilled.
        ca = tl.load(cand_a_ptr + c, mask=c < C, other=0)[None, :]
        cb = tl.load(cand_b_ptr + c, mask=c < C, other=0)[None, :]
        ka = tl.load(top1_buf[:, None] + ca)  # (ROWS, CP) keys of the candidates' halves
        kb = tl.load(top2_buf[:, None] + cb)
        sums = _key_score(ka) + _key_score(kb)
        if BF16_SUM:
            sums = _round_bf16(sums)
        flat = (low32 - (ka & low32)) * n + (low32 - (kb & low32))
        cand = tl.where((c < C)[None, :], _keys(sums, low32 - flat), INT64_MIN)
        if LOG_CAP >= LOG_C:
            best = _topk_rows(cand, ROWS, LOG_C, LOG_K, TL_TOPK)  # (ROWS, KP)
        else:
            # The k cells of row a = 0 come first: at least k candidates are >= their smallest key.
            lo = tl.min(tl.where((c < k)[None, :], cand, 2**63 - 1), axis=1)
            lo, count = _raise_bound(cand, lo, tl.max(cand, axis=1), _count_at_least(cand, lo), k, CAP)
            tl.store(cand_buf[:, None] + c[None, :], cand)
            tl.debug_barrier()  # (also orders the prefix sums after the halves' reads)
            pos = _kept_positions(cand >= lo[:, None], prefix_buf, ROWS, LOG_C, LOG_CAP)
            slot_ok = tl.arange(0, CAP)[None, :] < count[:, None]
            best = _topk_rows(
                tl.load(cand_buf[:, None] + pos, mask=slot_ok, other=INT64_MIN), ROWS, LOG_CAP, LOG_K, TL_TOPK
            )
        tl.store(out_ptr + rows[:, None] * k + rank, low32 - (best & low32), mask=row_ok[:, None] & (rank < k))


MIN_LOG_N, MIN_LOG_K = 7, 3  # rows of at least 128 entries, top lists of at least 8: fewer kernels to compile
CONFIG_KEYS = {"ROWS", "num_warps", "TL_TOPK", "FILTER"}

# Configurations ``benchmarks/kernels.py`` times at n = 1024, k = 32 (the compile check compiles each).
SWEEP_CONFIGS = [
    {"ROWS": 1, "num_warps": 1, "TL_TOPK": True, "FILTER": True},
    {"ROWS": 1, "num_warps": 2, "TL_TOPK": True, "FILTER": True},
    {"ROWS": 1, "num_warps": 4, "TL_TOPK": True, "FILTER": True},
    {"ROWS": 1, "num_warps": 1, "TL_TOPK": True, "FILTER": False},  # sorting whole rows, as before the filter
]


def select_config(n: int, k: int, device: torch.device) -> dict:
    """Rows per program, warps, sort network and whether to filter, for ``n`` sub-keys and top ``k``.

    CUDA: one row (t, h) per program; ``benchmarks/kernels.py`` sweeps ``SWEEP_CONFIGS`` on a real card.
    Interpreted (CPU): many rows per program (up to 64, 65,536 entries), which numpy vectorises, and
    our sort network (the interpreter runs ``tl.topk``'s xor reductions element by element in Python).
    """
    sizes = kernel_constexprs(n, k, {"FILTER": True})
    if device.type != "cuda":
        return {"ROWS": min(64, 1 << (16 - sizes["LOG_N"])), "num_warps": 1, "TL_TOPK": False, "FILTER": True}
    # About 32 scores or 16 grid candidates per thread: at n = 1024, k = 32 one warp measured fastest
    # on an H200 (with the previous, unfiltered kernel; benchmarks/RESULTS.md).
    return {
        "ROWS": 1,
        "num_warps": max(1, (1 << max(sizes["LOG_N"], sizes["LOG_C"] + 1)) // 1024),
        "TL_TOPK": True,
        "FILTER": True,
    }


def kernel_constexprs(n: int, k: int, config: dict) -> dict:
    """The kernel's size constexprs for ``n``, ``k``: row, top list, grid candidates and filter slots (log2).

    Padded row 2**LOG_N >= max(n, 128, KP), top list KP = 2**LOG_K >= max(k, 8), grid candidates
    2**LOG_C >= C(KP) >= C(k), filter slots 2**LOG_CAP = 2 KP (FILTER) or no filter (LOG_CAP covers both).
    """
    log_k = max((k - 1).bit_length(), MIN_LOG_K)
    log_n = max((n - 1).bit_length(), MIN_LOG_N, log_k)
    log_c = (_grid_cells(1 << log_k) - 1).bit_length()
    log_cap = log_k + 1 if config["FILTER"] else max(log_n, log_c)
    return {"LOG_N": log_n, "LOG_K": log_k, "LOG_C": log_c, "LOG_CAP": log_cap}


def _scratch(rows: int, sizes: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scratch row: max(2**LOG_N, 2**LOG_C) int32 prefix sums; top lists 2 x 2**LOG_K and grid
    candidates 2**LOG_C as int64 keys."""
    prefix = torch.empty(rows << max(sizes["LOG_N"], sizes["LOG_C"]), dtype=torch.int32, device=device)
    keys = torch.empty(rows * ((2 << sizes["LOG_K"]) + (1 << sizes["LOG_C"])), dtype=torch.int64, device=device)
    return prefix, keys


@functools.cache
def _grid_cells(k: int) -> int:
    """C(k) = len(grid_candidates(k)[0]) = sum_r floor(k / r)."""
    return sum(k // r for r in range(1, k + 1))


@functools.cache
def _candidates(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.grid_candidates(k)`` as int32 tensors on ``device`` (made once per k and device)."""
    return tuple(x.to(device=device, dtype=torch.int32) for x in grid_candidates(k))


def product_key_select_triton(s1: torch.Tensor, s2: torch.Tensor, k: int, config: dict | None = None) -> torch.Tensor:
    """s1, s2 (T, H, n) float32 or bfloat16 sub-key scores -> (T, H, k) int64 flat ids ``i*n + j``, best first.

    The same ids, in the same order, as the reference's three top-k passes (ties to the lower flat id;
    bfloat16: the grid sums are rounded to bfloat16, as the reference's bfloat16 grid is). Any strides
    with a unit last one are read in place. ``config``: overrides ``select_config``. Takes the range
    ``triton_unsupported`` states (``__init__.py``).
    """
    if s1.dim() != 3 or s1.shape != s2.shape or s1.dtype != s2.dtype:
        raise ValueError(
            "product_key_select_triton: s1 and s2 must be (T, H, n) of one dtype, "
            f"got {tuple(s1.shape)} {s1.dtype} and {tuple(s2.shape)} {s2.dtype}"
        )
    T, H, n = s1.shape
    problem = triton_unsupported(n, k, s1.dtype)
    if problem is not None:
        raise ValueError(f"product_key_select_triton: {problem}; use the reference (product_key_topk_reference)")
    out = torch.empty(T, H, k, dtype=torch.int64, device=s1.device)
    if T * H == 0:
        return out
    s1 = s1 if s1.stride(-1) == 1 else s1.contiguous()
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    cfg = dict(config or select_config(n, k, s1.device))
    if set(cfg) != CONFIG_KEYS or cfg["ROWS"] & (cfg["ROWS"] - 1):
        raise ValueError(
            f"product_key_select_triton: config needs keys {sorted(CONFIG_KEYS)}, ROWS a power of two; got {cfg}"
        )
    sizes = kernel_constexprs(n, k, cfg)
    del cfg["FILTER"]
    cand_a, cand_b = _candidates(k, s1.device)
    programs = min(triton.cdiv(T * H, cfg["ROWS"]), MAX_PROGRAMS)
    prefix, keys = _scratch(programs * cfg["ROWS"], sizes, s1.device)
    _product_key_select_kernel[(programs,)](
        s1,
        s2,
        out,
        cand_a,
        cand_b,
        prefix,
        keys,
        T * H,
        H,
        n,
        k,
        len(cand_a),
        s1.stride(0),
        s1.stride(1),
        s2.stride(0),
        s2.stride(1),
        BF16_SUM=s1.dtype == torch.bfloat16,
        maxnreg=255,  # all registers may be used: by default ptxas spills in some configurations to fit more warps
        **sizes,
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
    regathered as the reference does, with the backward of ``backward.py`` (gathers of the selected
    sub-keys, no dense score gradient). float32 and bfloat16 scores use the kernel; others (float64,
    float16) go to the reference. Inputs are not validated here.
    """
    n = keys1.shape[1]
    with torch.no_grad():
        s1 = torch.einsum("thd,hnd->thn", q1, keys1)  # (T, H, n)
        s2 = torch.einsum("thd,hnd->thn", q2, keys2)
    if s1.dtype not in (torch.float32, torch.bfloat16):
        return product_key_topk_reference(q1, q2, keys1, keys2, k, select=library.select)  # (rare dtypes only)
    if config is None:  # the default configuration, as the custom op torch.compile sees as one node
        indices = library.select(s1, s2, k, impl="triton")
    else:
        indices = product_key_select_triton(s1, s2, k, config)
    i = torch.div(indices, n, rounding_mode="floor")
    return selected_scores(q1, q2, keys1, keys2, s1, s2, i, indices - i * n), indices
