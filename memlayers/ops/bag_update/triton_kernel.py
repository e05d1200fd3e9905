"""Triton segment sums over entries sorted by row, with a per-row epilogue: the optimizer update of a
table straight from a bag's backward inputs (``bag_update_triton``), or the bag's value gradient
(``embedding_bag.triton_backward``: the "store" epilogue).

The entries are sorted by row (stable ``torch.sort``, no host sync); a segment is one row's run. The
sorted positions are cut into chunks of ``chunk`` positions, one program each, so every program has
the same work whatever the rows' lengths. A program walks its chunk in groups of ``G`` positions: it
loads the G weighted source rows, whole (``BLOCK_D`` >= d columns; column blocks are looped only when
d > ``MAX_BLOCK_D``), and a segmented scan down the group, started from the running sum carried over
from the group before, leaves at each segment's last position the sum of its entries in sorted order:
bitwise deterministic, each row's gradient held in registers only. A segment that starts and ends in
the chunk is complete there, and the epilogue applies at once to its row: Adam, row-wise Adagrad or SGD
on the table and its state (``row_update.triton_kernel``'s math), or storing the row gradient.

A segment cut by a chunk border leaves fp32 partial sums, "carries": chunk p writes its first piece
(if the segment began in an earlier chunk) to slot 2p and its last piece (if it goes on into a later
one) to slot 2p + 1, keyed by the segment (-1: slot unused; a chunk inside one segment puts its sum in
2p and zeros in 2p + 1). Equal keys stay adjacent, so the same kernel sums the carries (no gather),
and so on, level by level, until one chunk holds them all: a row read by every one of E entries is
summed by E / chunk programs, then 2E / chunk**2, ..., never serialised on one program. The levels and
their grids follow from E alone: no host sync, and the launches can be captured in a CUDA graph.

With WEIGHT_GRAD the first level also writes each entry's weight gradient <src row, value row>, one
store per entry, reading the value rows before any update of the same pass writes them: within a group
the dot's reduction (a barrier across warps, shuffles within one) comes between the loads and the
epilogue's stores, earlier groups are done, and a row is only ever written by the program that ends
its segment, after every entry of it has been read.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..embedding_bag.triton_forward import accumulation_dtype, tl_dtype
from ..row_update.triton_kernel import adagrad_math, adam_math, stochastic_round_bf16
from .reference import adam_step_size

STORE, SGD, ADAGRAD, ADAM = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
RULES = {"sgd": SGD.value, "adagrad": ADAGRAD.value, "adam": ADAM.value}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK_D = 4096  # widest row a program holds whole; wider tables loop over column blocks (segment_config)
MIN_CHUNK, MAX_CHUNK, TARGET_PROGRAMS = 16, 1024, 4096


@triton.jit
def _crossing(keys_ptr, pos, neighbour, has_neighbour):
    """The key at sorted position ``pos`` if its segment also holds position ``neighbour``, else -2 (no key:
    an int rather than a flag, as flags held through the loops end up spilled)."""
    key = tl.load(keys_ptr + pos)
    return tl.where((key >= 0) & (tl.load(keys_ptr + neighbour, mask=has_neighbour, other=-1) == key), key, -2)


@triton.jit
def _group(
    keys_ptr, order_ptr, weights_ptr, srows_ptr, src_ptr, g0, c0, c1, n, L, stride_s, cols, mask_d, carry,
    GATHER: tl.constexpr, SROWS: tl.constexpr, ACC: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    """Sorted positions s = g0 .. g0 + G - 1 of the chunk [c0, c1) on columns ``cols``.

    Returns s; their keys k; live (in the chunk, k >= 0); ends (the segment's last position); entry; the
    unweighted source rows x (1, G, BLOCK_D); acc (G, BLOCK_D): the weighted sum of each position's segment
    from its start in the chunk (or from c0) through s, continuing ``carry`` (the sum through g0 - 1);
    and the new carry (the sum through g0 + G - 1).
    """
    s = g0 + tl.arange(0, G)
    valid = s < c1
    # past the chunk's end a position takes the key of its last one (adding nothing): the carry passes on
    k = tl.load(keys_ptr + tl.minimum(s, c1 - 1))
    ends = (s + 1 == n) | (k != tl.load(keys_ptr + s + 1, mask=s + 1 < n, other=-1))
    live = valid & (k >= 0)
    if GATHER:
        entry = tl.load(order_ptr + s, mask=live, other=0)
        w = tl.load(weights_ptr + entry, mask=live, other=0).to(ACC)
        if SROWS:
            row = tl.load(srows_ptr + entry, mask=live, other=0).to(tl.int64)
        else:
            row = (entry // L).to(tl.int64)
    else:
        entry = s
        w = tl.full((G,), 1, ACC)
        row = s
    continues = (g0 > c0) & (tl.load(keys_ptr + g0 - 1, mask=g0 > c0, other=-1) == tl.load(keys_ptr + g0))
    rows = tl.arange(0, G)
    # x as (1, G, BLOCK_D) straight from memory: the (G, G, BLOCK_D) selection below then keeps its layout
    x = tl.load(src_ptr + row[None, :, None] * stride_s + cols[None, None, :],
                mask=live[None, :, None] & mask_d[None, None, :], other=0).to(ACC)  # fmt: skip
    y = x * w[None, :, None] + tl.where(((rows == 0) & continues)[None, :, None], carry[None, None, :], 0)
    # acc[i] = sum of y[j] over j <= i of i's segment (equal keys), in order of j: the other terms add
    # -0.0, which is exact. Each thread holds all G x G of its columns: no data moves between threads.
    same = (rows[None, :] <= rows[:, None]) & (k[None, :] == k[:, None])
    acc = tl.sum(tl.where(same[:, :, None], y, -0.0), axis=1)
    carry = tl.sum(tl.where((rows == G - 1)[:, None], acc, -0.0), axis=0)
    return s, k, live, ends, entry, x, acc, carry


@triton.jit
def _epilogue(
    acc, row_sq, k, apply, d0, cols, mask_d, D, out_ptr, stride_o, state1_ptr, stride_1, state2_ptr, stride_2,
    scale, seed, beta2, one_minus_beta1, one_minus_beta2, eps, EPILOGUE: tl.constexpr, SR: tl.constexpr,
    SUM_SQ_DONE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Apply the gradients ``acc`` (G, BLOCK_D) of the rows ``k`` where ``apply`` on the columns ``cols`` = d0 +
    arange(BLOCK_D); row_sq: their g·g over all d (SUM_SQ_DONE: their new Adagrad accumulators, stored already)."""
    r = k.to(tl.int64)
    mask = apply[:, None] & mask_d[None, :]
    o_ptrs = out_ptr + r[:, None] * stride_o + cols[None, :]
    if EPILOGUE == STORE:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        p = tl.load(o_ptrs, mask=mask, other=0).to(tl.float32)
        if EPILOGUE == SGD:
            p = p - scale * acc
        elif EPILOGUE == ADAGRAD:
            if SUM_SQ_DONE:
                _, row_scale = adagrad_math(row_sq, 0.0, scale, eps)
            else:
                s_ptrs = state1_ptr + r
                s, row_scale = adagrad_math(tl.load(s_ptrs, mask=apply, other=0).to(tl.float32), row_sq / D, scale, eps)
                tl.debug_barrier()  # every warp has read the old accumulators (one thread stores each new one)
                tl.store(s_ptrs, s.to(state1_ptr.dtype.element_ty), mask=apply)
            p = p - row_scale[:, None] * acc
        else:
            m_ptrs = state1_ptr + r[:, None] * stride_1 + cols[None, :]
            v_ptrs = state2_ptr + r[:, None] * stride_2 + cols[None, :]
            m = tl.load(m_ptrs, mask=mask, other=0).to(tl.float32)
            v = tl.load(v_ptrs, mask=mask, other=0).to(tl.float32)
            p, m, v = adam_math(p, m, v, acc, scale, beta2, one_minus_beta1, one_minus_beta2, eps)
            tl.store(m_ptrs, m.to(state1_ptr.dtype.element_ty), mask=mask)
            tl.store(v_ptrs, v.to(state2_ptr.dtype.element_ty), mask=mask)
        if SR:  # one Philox counter per 8 consecutive elements of the table (BLOCK_D and the block start are multiples of 8)
            counters = r[:, None] * tl.cdiv(D, 8) + (d0 // 8 + tl.arange(0, BLOCK_D // 8))[None, :]
            p = stochastic_round_bf16(p, seed, counters)
        tl.store(o_ptrs, p.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _segment_kernel(
    keys_ptr,  # (n,) int32/int64 sorted: each position's segment key (-1: an unused carry slot)
    order_ptr,  # (n,) entry at each position (GATHER)
    weights_ptr,  # (E,) weight of each entry (GATHER)
    srows_ptr,  # (E,) source row of each entry (GATHER and SROWS; else entry // L)
    src_ptr,  # (S, D) rows summed, row stride `stride_s`; unit column stride
    vrows_ptr,  # (n,) value row at each position (WEIGHT_GRAD)
    values_ptr,  # (N, D) value table, row stride `stride_v` (WEIGHT_GRAD)
    dw_ptr,  # (E,) ACC: each entry's weight gradient (WEIGHT_GRAD)
    out_ptr,  # STORE: (R, D) row gradients; else the (N, D) table; row stride `stride_o`
    state1_ptr,  # ADAM: exp_avg (N, D), row stride `stride_1`; ADAGRAD: sum_sq (N,)
    state2_ptr,  # ADAM: exp_avg_sq (N, D), row stride `stride_2`
    carry_keys_ptr,  # (2 * programs,) out (CARRY)
    carry_ptr,  # (2 * programs, D) ACC out (CARRY)
    sq_ptr,  # (programs,) fp32 out: sum of g·g over the rows this program updated (not STORE)
    scratch_ptr,  # (n,) fp32: the updated rows' g·g over column blocks, then their new sum_sq (ADAGRAD, not ONE_BLOCK)
    scale,  # lr (SGD, ADAGRAD) or Adam's step size: a float, or (SCALE_PTR) a pointer to a 0-dim fp32 tensor
    seed,  # Philox seed (SR): an int, or (SEED_PTR) a pointer to a 0-dim int64 tensor
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    n,
    chunk,
    L,
    D,
    stride_s,
    stride_v,
    stride_o,
    stride_1,
    stride_2,
    GATHER: tl.constexpr,
    SROWS: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    CARRY: tl.constexpr,
    EPILOGUE: tl.constexpr,
    SR: tl.constexpr,
    SCALE_PTR: tl.constexpr,
    SEED_PTR: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if SCALE_PTR:
        scale = tl.load(scale)
    if SEED_PTR:
        seed = tl.load(seed)
    pid = tl.program_id(0)
    c0 = pid.to(tl.int64) * chunk
    c1 = tl.minimum(c0 + chunk, n)
    head = _crossing(keys_ptr, c0, c0 - 1, c0 > 0)  # the first segment's key if it began in an earlier chunk
    TWO_SWEEPS: tl.constexpr = EPILOGUE == ADAGRAD and not ONE_BLOCK  # Adagrad needs g·g over all d first
    sq_total = tl.zeros((), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask_d = cols < D
        carry = tl.zeros((BLOCK_D,), ACC)
        for g0 in range(c0, c1, G):
            s, k, live, ends, entry, x, acc, carry = _group(
                keys_ptr, order_ptr, weights_ptr, srows_ptr, src_ptr, g0, c0, c1, n, L, stride_s, cols, mask_d,
                carry, GATHER, SROWS, ACC, G,
            )  # fmt: skip
            if WEIGHT_GRAD:
                vrow = tl.load(vrows_ptr + s, mask=live, other=0).to(tl.int64)
                v = tl.load(values_ptr + vrow[None, :, None] * stride_v + cols[None, None, :],
                            mask=live[None, :, None] & mask_d[None, None, :])  # fmt: skip
                dw = tl.sum(x * v.to(ACC), axis=2)  # (1, G)
                if not ONE_BLOCK:
                    dw += tl.load(dw_ptr + entry[None, :], mask=live[None, :] & (d0 > 0), other=0)
                tl.store(dw_ptr + entry[None, :], dw, mask=live[None, :])
            in_head = k == head
            apply = live & ends & ~in_head
            row_sq = live  # (unused by STORE)
            if EPILOGUE != STORE:
                row_sq = tl.sum(acc * acc, axis=1)
                sq_total += tl.sum(tl.where(apply, row_sq, 0), axis=0)
            if TWO_SWEEPS:  # each thread adds to and stores its own load (the others' loads go unused)
                row_sq += tl.load(scratch_ptr + s, mask=apply & (d0 > 0), other=0)
                tl.store(scratch_ptr + s, row_sq, mask=apply)
            else:
                _epilogue(
                    acc, row_sq, k, apply, d0, cols, mask_d, D, out_ptr, stride_o, state1_ptr, stride_1, state2_ptr,
                    stride_2, scale, seed, beta2, one_minus_beta1, one_minus_beta2, eps, EPILOGUE, SR, False, BLOCK_D,
                )  # fmt: skip
            if CARRY:  # noqa: SIM102 (compile-time, then run-time): the first piece ends in this group: its sum to slot 2p
                if (tl.load(keys_ptr + g0) == head) & (tl.load(keys_ptr + g0 + G, mask=g0 + G < c1, other=-1) != head):
                    ending = live & in_head & (ends | (s == c1 - 1))
                    piece = tl.sum(tl.where(ending[:, None], acc, -0.0), axis=0)
                    tl.store(carry_ptr + (2 * pid).to(tl.int64) * D + cols, piece, mask=mask_d)
        if CARRY:  # the last piece to slot 2p + 1; zeros if it was the first one too (the whole chunk)
            tail = _crossing(keys_ptr, c1 - 1, c1, c1 < n)  # the last segment's key if it goes on into a later one
            tl.store(carry_ptr + (2 * pid + 1).to(tl.int64) * D + cols, tl.where(tail == head, 0.0, carry).to(ACC),
                     mask=mask_d & (tail >= 0))  # fmt: skip
    if TWO_SWEEPS:  # the rows' g·g is complete: their new accumulators, then sum their gradients again and apply
        tl.debug_barrier()
        for g0 in range(c0, c1, G):
            s = g0 + tl.arange(0, G)
            k = tl.load(keys_ptr + tl.minimum(s, c1 - 1))
            ends = (s + 1 == n) | (k != tl.load(keys_ptr + s + 1, mask=s + 1 < n, other=-1))
            apply = (s < c1) & (k >= 0) & ends & (k != head)
            r = k.to(tl.int64)
            old = tl.load(state1_ptr + r, mask=apply, other=0).to(tl.float32)
            new, _ = adagrad_math(old, tl.load(scratch_ptr + s, mask=apply, other=0) / D, scale, eps)
            tl.store(state1_ptr + r, new.to(state1_ptr.dtype.element_ty), mask=apply)
            tl.store(scratch_ptr + s, new, mask=apply)
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask_d = cols < D
            carry = tl.zeros((BLOCK_D,), ACC)
            for g0 in range(c0, c1, G):
                s, k, live, ends, entry, x, acc, carry = _group(
                    keys_ptr, order_ptr, weights_ptr, srows_ptr, src_ptr, g0, c0, c1, n, L, stride_s, cols, mask_d,
                    carry, GATHER, SROWS, ACC, G,
                )  # fmt: skip
                apply = live & ends & (k != head)
                new = tl.load(scratch_ptr + s, mask=apply, other=0)
                _epilogue(
                    acc, new, k, apply, d0, cols, mask_d, D, out_ptr, stride_o, state1_ptr, stride_1, state2_ptr,
                    stride_2, scale, seed, beta2, one_minus_beta1, one_minus_beta2, eps, EPILOGUE, SR, True, BLOCK_D,
                )  # fmt: skip
    if CARRY:
        tl.store(carry_keys_ptr + 2 * pid, tl.maximum(head, -1))
        tl.store(carry_keys_ptr + 2 * pid + 1, tl.maximum(_crossing(keys_ptr, c1 - 1, c1, c1 < n), -1))
    if EPILOGUE != STORE:
        tl.store(sq_ptr + pid, sq_total)


def segment_config(d: int, kind: int) -> dict:
    """Group size G, row block and warps for rows of width d and the epilogue ``kind``.

    Whole rows up to MAX_BLOCK_D columns (wider: blocks of MAX_BLOCK_D / 2), at most 8 columns per thread (then each thread holds every row of
    the group for its columns: see ``_group``) and 16 (Adam: 8, it holds four tiles) elements of the group
    per thread: d = 1024 is 4 warps, G = 2 (Adam 1). ``maxnreg``: without it ptxas trades a spilled register
    for occupancy in some variants; 128 keeps at least 16 warps per SM (and is all 16 warps may have).
    """
    # wider rows loop over blocks of half that (the loop's own state would not fit beside a whole block)
    block_d = max(16, triton.next_power_of_2(d) if d <= MAX_BLOCK_D else MAX_BLOCK_D // 2)
    num_warps = min(16, max(1, block_d // 256))
    per_thread = max(1, block_d // (32 * num_warps))  # columns of a row each thread holds
    G = min(16, max(1, (8 if kind == ADAM.value else 16) // per_thread))
    return {"G": G, "BLOCK_D": block_d, "num_warps": num_warps, "maxnreg": 128}


def chunk_size(n: int) -> int:
    """Sorted positions per program for a level of n positions: about TARGET_PROGRAMS programs, chunks a
    power of two in [MIN_CHUNK, MAX_CHUNK] (at least 4, so that each level has fewer slots than the one
    before). The carry levels, mostly empty slots, get small chunks too: a row read by most entries has
    its pieces summed by many programs at every level."""
    return min(MAX_CHUNK, max(MIN_CHUNK, triton.next_power_of_2(triton.cdiv(n, TARGET_PROGRAMS))))


class Epilogue(NamedTuple):
    """What happens to each complete row gradient: ``kind`` STORE (into ``out[key]``, (R, d)) or an update
    rule (SGD, ADAGRAD, ADAM) of the table ``out`` (N, d) with its ``state1``/``state2`` (see the kernel);
    ``scale`` is lr or Adam's step size (float or 0-dim fp32 tensor); ``seed`` (int or 0-dim int64 tensor)
    turns on stochastic rounding of a bf16 table."""

    kind: int
    out: torch.Tensor
    state1: torch.Tensor | None = None
    state2: torch.Tensor | None = None
    scale: float | torch.Tensor = 0.0
    seed: int | torch.Tensor | None = None
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0


def segment_reduce(keys, src, epilogue: Epilogue, gather=None, weight_grad=None) -> torch.Tensor | None:
    """Sum each segment of ``keys`` and hand it to ``epilogue``; returns the sum of g·g over the updated
    rows (0-dim fp32) for an update rule, None for STORE.

    Args:
        keys: (n,) int32/int64, equal keys adjacent (sorted): the segments, and each one's row of
            ``epilogue.out``.
        src: (S, d) rows to sum, unit column stride.
        gather: ``(order (n,), weights (E,), src_rows (E,) or None, L)``: position s adds
            ``weights[order[s]] * src[src_rows[order[s]]]`` (``src[order[s] // L]`` without src_rows);
            None: ``src[s]`` (n == S).
        weight_grad: ``(vrows (n,), values (N, d), dw (E,) in src's accumulation dtype)``: also writes
            ``dw[order[s]] = <src row of s, values[vrows[s]]>`` (needs ``gather``).
    """
    n, d = keys.numel(), src.shape[1]
    if n == 0 or d == 0:
        return None if epilogue.kind == STORE.value else src.new_zeros((), dtype=torch.float32)
    cfg = segment_config(d, epilogue.kind)
    levels = []  # (chunk, programs) per level; each level's carries (2 per program) are the next one's positions
    while not levels or levels[-1][1] > 1:
        chunk = chunk_size(2 * levels[-1][1] if levels else n)
        if chunk < 4:  # smaller chunks would not shrink the levels
            raise ValueError(f"segment_reduce: chunks need at least 4 positions, got {chunk}")
        levels.append((chunk, triton.cdiv(2 * levels[-1][1] if levels else n, chunk)))
    acc = accumulation_dtype(src.dtype)
    updating = epilogue.kind != STORE.value
    sq = torch.empty(sum(P for _, P in levels), dtype=torch.float32, device=src.device) if updating else None
    e = epilogue
    state1 = e.state1 if e.state1 is not None else e.out
    state2 = e.state2 if e.state2 is not None else e.out
    one_block = cfg["BLOCK_D"] >= d
    first = 0
    for chunk, P in levels:
        carry = P > 1
        carry_keys = torch.empty(2 * P, dtype=keys.dtype, device=keys.device) if carry else keys
        carries = torch.empty(2 * P, d, dtype=acc, device=src.device) if carry else src
        two_sweeps = e.kind == ADAGRAD.value and not one_block
        scratch = torch.empty(keys.numel(), dtype=torch.float32, device=src.device) if two_sweeps else src
        order, weights, src_rows, L = gather or (keys, src, None, 1)
        vrows, values, dw = weight_grad or (keys, src, src)
        _segment_kernel[(P,)](
            keys, order, weights, src_rows if src_rows is not None else keys, src, vrows, values, dw,
            e.out, state1, state2, carry_keys, carries, sq[first:] if updating else src, scratch,
            e.scale, 0 if e.seed is None else e.seed, e.beta2, 1 - e.beta1, 1 - e.beta2, e.eps,
            keys.numel(), chunk, L, d, src.stride(0), values.stride(0), e.out.stride(0), state1.stride(0),
            state2.stride(0),
            GATHER=gather is not None, SROWS=src_rows is not None, WEIGHT_GRAD=weight_grad is not None,
            CARRY=carry, EPILOGUE=e.kind, SR=e.seed is not None, SCALE_PTR=isinstance(e.scale, torch.Tensor),
            SEED_PTR=isinstance(e.seed, torch.Tensor), ONE_BLOCK=one_block, ACC=tl_dtype(acc), **cfg,
        )  # fmt: skip
        first += P
        keys, src, gather, weight_grad = carry_keys, carries, None, None
    return sq.sum() if updating else None


def bag_update_triton(
    param, state: dict, ids, weights, src_rows, src, rule: str, *, lr, step=None, beta1=0.9, beta2=0.999,
    eps=1e-8, seed=None, weight_grad_out=None,
) -> torch.Tensor:  # fmt: skip
    """``memlayers.ops.bag_update`` on the GPU (inputs already checked; ``seed`` not None: stochastic
    rounding). No host sync: lr, step and seed may be device tensors, read by the kernels."""
    E, d = ids.numel(), param.shape[1]
    if E == 0 or d == 0:
        if weight_grad_out is not None:
            weight_grad_out.zero_()
        return torch.zeros((), dtype=torch.float32, device=param.device)
    keys = ids.int() if param.shape[0] < 2**31 else ids.long()  # 32-bit keys halve the radix sort's passes
    sorted_keys, order = torch.sort(keys, stable=True)
    scale = adam_step_size(lr, beta1, beta2, step) if rule == "adam" else lr
    names = {"adam": ("exp_avg", "exp_avg_sq"), "adagrad": ("sum_sq",), "sgd": ()}[rule]
    epilogue = Epilogue(RULES[rule], param, *(state[k] for k in names), scale=scale, seed=seed, beta1=beta1,
                        beta2=beta2, eps=eps)  # fmt: skip
    src = src if src.stride(1) == 1 else src.contiguous()
    wgrad = None
    if weight_grad_out is not None:
        direct = weight_grad_out.dtype == torch.float32 and weight_grad_out.is_contiguous()
        dw = weight_grad_out if direct else torch.empty(E, dtype=torch.float32, device=param.device)
        wgrad = (sorted_keys, param, dw)
    gather = (order, weights.contiguous(), src_rows.contiguous(), 1)
    sq = segment_reduce(sorted_keys, src, epilogue, gather, wgrad)
    if wgrad is not None and not direct:
        weight_grad_out.copy_(dw)
    return sq
