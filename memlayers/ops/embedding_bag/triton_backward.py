"""Triton backward of the weighted embedding bag.

* weight gradient ``dw[t, l] = <grad_out[t], values[indices[t, l]]>``: a gathered dot, computed by
  ``memlayers.ops.gather_dot``'s kernel (``gather_dot_triton``);
* value gradient ``dV[r] = sum_{(t, l): indices[t, l] = r} weights[t, l] * grad_out[t]``, two ways:
  - ``"atomics"``: grid ``(T, cdiv(d, BLOCK_D))``, each program adds ``w * grad_out[t]`` into its
    rows of an fp32 buffer with ``atomic_add``. Fast, not deterministic;
  - ``"sorted"``: entries sorted by row (stable ``torch.sort``), then ``bag_update``'s segment kernel
    (``memlayers.ops.bag_update.triton_kernel``) with the "store" epilogue: programs over equal chunks
    of the sorted entries, each holding whole rows, each touched row's gradient summed in sorted
    order (bitwise deterministic) and stored once; a row cut by chunk borders (a hot row read by most
    entries too) is finished by the kernel's carry levels, never by one program alone. When both
    gradients are wanted (``bag_backward_triton``) the same pass writes each entry's weight gradient
    (one store per entry, the dot over the whole row), reading each touched value row once.

Host syncs: none for a dense gradient; one for a row-sparse one (its row count sizes the COO tensor).
Zero fill: a dense gradient zeroes only its untouched rows (a touched-row mask, then a kernel writing
zeros to the others: each row written once); the row-sparse path does no O(N) work.
"""

import torch
import triton
import triton.language as tl

from ..bag_update.triton_kernel import MAX_CHUNK as CHUNK  # noqa: F401 (most sorted entries one program sums)
from ..bag_update.triton_kernel import STORE, Epilogue, segment_reduce
from ..gather_dot.triton_kernel import gather_dot_triton
from .triton_forward import accumulation_dtype, tl_dtype


@triton.jit
def _scatter_atomic_kernel(
    dest_ptr,  # (T, L) contiguous: row of `out` each entry adds into
    weights_ptr,  # (T, L) contiguous
    grad_ptr,  # (T, d) contiguous
    out_ptr,  # (R, d) contiguous, ACC dtype, pre-zeroed
    L,
    D,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    g = tl.load(grad_ptr + t * D + offs_d, mask=mask_d, other=0).to(ACC)
    offs_l = tl.arange(0, BLOCK_L)
    for l0 in range(0, L, BLOCK_L):
        mask_l = l0 + offs_l < L
        dest = tl.load(dest_ptr + t * L + l0 + offs_l, mask=mask_l, other=0).to(tl.int64)
        w = tl.load(weights_ptr + t * L + l0 + offs_l, mask=mask_l, other=0).to(ACC)
        tl.atomic_add(
            out_ptr + dest[:, None] * D + offs_d[None, :],
            w[:, None] * g[None, :],
            mask=mask_l[:, None] & mask_d[None, :],
            sem="relaxed",
        )


@triton.jit
def _zero_untouched_kernel(
    out_ptr,  # (N, d), row stride `stride_o`, unit column stride
    touched_ptr,  # (N,) uint8: 1 for rows the sorted pass writes
    N,
    D,
    stride_o,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    zero = (rows < N) & (tl.load(touched_ptr + rows, mask=rows < N, other=1) == 0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(
            out_ptr + rows[:, None] * stride_o + cols[None, :],
            tl.zeros((BLOCK_R, BLOCK_D), out_ptr.dtype.element_ty),
            mask=zero[:, None] & (cols < D)[None, :],
        )


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), 256)


def weight_grad_triton(
    values: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """values (N, d), indices (T, L), grad_out (T, d) -> dw (T, L) float32 (float64 if an input is).

    ``out``, if given, is a contiguous (T, L) tensor (any float dtype) that is overwritten.
    """
    return gather_dot_triton(values, indices, grad_out, out=out)


def _scatter_atomic(dest: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, num_rows: int) -> torch.Tensor:
    """dest (T, L) rows in [0, num_rows), weights (T, L), grad_out (T, d) -> (num_rows, d) accumulation dtype."""
    T, L = dest.shape
    d = grad_out.shape[1]
    acc = accumulation_dtype(grad_out.dtype)
    out = torch.zeros(num_rows, d, dtype=acc, device=grad_out.device)
    block_d = _block_d(d)
    _scatter_atomic_kernel[(T, triton.cdiv(d, block_d))](
        dest.contiguous(),
        weights.contiguous(),
        grad_out.contiguous(),
        out,
        L,
        d,
        ACC=tl_dtype(acc),
        BLOCK_L=min(triton.next_power_of_2(L), 8),
        BLOCK_D=block_d,
        num_warps=max(1, block_d // 128),
    )
    return out


def _zero_untouched(out: torch.Tensor, keys: torch.Tensor) -> None:
    """Zero the rows of out (N, d) that no entry of keys (E,) touches (the others are written by the sorted pass)."""
    N, d = out.shape
    touched = torch.zeros(N, dtype=torch.uint8, device=out.device)
    touched[keys] = 1
    block_d = min(triton.next_power_of_2(d), 1024)
    block_r = max(1, 2048 // block_d)
    _zero_untouched_kernel[(triton.cdiv(N, block_r),)](
        out, touched, N, d, out.stride(0), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4
    )


def bag_backward_triton(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    algorithm: str = "sorted",
    sparse: bool = False,
    need_values: bool = True,
    need_weights: bool = True,
):
    """Both gradients of the bag: ``(value grad or None, weight grad (T, L) in weights.dtype or None)``.

    values (N, d), indices (T, L), weights (T, L), grad_out (T, d). The value gradient is as in
    ``value_grad_triton``. With ``"sorted"`` and both gradients wanted, one pass over the sorted entries
    computes both (each touched value row read from memory once, each entry's weight gradient a dot
    over the whole row, stored once: deterministic); otherwise ``weight_grad_triton`` reads the T x L
    rows again.
    """
    grad_out = grad_out.to(values.dtype)
    if not (need_values and need_weights and algorithm == "sorted"):
        dw = dv = None
        if need_weights:
            dw = torch.empty(weights.shape, dtype=weights.dtype, device=weights.device)
            weight_grad_triton(values, indices, grad_out, out=dw)
        if need_values:
            dv = value_grad_triton(indices, weights, grad_out, values.shape[0], algorithm, sparse)
        return dv, dw
    return _value_grad_sorted(indices, weights, grad_out, values.shape[0], sparse, values)


def value_grad_triton(
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    num_rows: int,
    algorithm: str = "sorted",
    sparse: bool = False,
):
    """Value-table gradient of the bag, in grad_out.dtype.

    indices (T, L) in [0, num_rows), weights (T, L), grad_out (T, d) ->
    ``(rows (U,) sorted unique int64, row_grads (U, d))`` if ``sparse`` else dense ``(num_rows, d)``.
    ``"sorted"``: no host sync for the dense gradient, one for the sparse one; ``"atomics"`` sparse
    syncs in ``torch.unique``.
    """
    if algorithm not in ("sorted", "atomics"):
        raise ValueError(f"value_grad_triton: algorithm must be 'sorted' or 'atomics', got {algorithm!r}")
    if algorithm == "sorted":
        return _value_grad_sorted(indices, weights, grad_out, num_rows, sparse)[0]
    T, L = indices.shape
    d = grad_out.shape[1]
    if indices.numel() == 0 or d == 0:
        return _empty_value_grad(grad_out, num_rows, sparse)
    grad_out = grad_out.contiguous()
    if not sparse:
        return _scatter_atomic(indices, weights, grad_out, num_rows).to(grad_out.dtype)
    keys = indices.reshape(-1)
    keys = keys.int() if num_rows < 2**31 else keys
    rows, inverse = torch.unique(keys, return_inverse=True)
    return rows.long(), _scatter_atomic(inverse.view(T, L), weights, grad_out, len(rows)).to(grad_out.dtype)


def _empty_value_grad(grad_out, num_rows: int, sparse: bool):
    d = grad_out.shape[1]
    if sparse:
        return grad_out.new_zeros(0, dtype=torch.int64), grad_out.new_zeros(0, d)
    return grad_out.new_zeros(num_rows, d)


def _value_grad_sorted(indices, weights, grad_out, num_rows: int, sparse: bool, values=None):
    """The deterministic sorted value gradient (as ``value_grad_triton``) and, given ``values``, the
    weight gradient (T, L) in weights.dtype from the same pass (else None)."""
    T, L = indices.shape
    d = grad_out.shape[1]
    device, dtype = grad_out.device, grad_out.dtype
    if indices.numel() == 0 or d == 0:
        dw = None if values is None else torch.zeros_like(weights)
        return _empty_value_grad(grad_out, num_rows, sparse), dw
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    keys = indices.reshape(-1)
    keys = keys.int() if num_rows < 2**31 else keys.long()  # 32-bit keys halve the radix sort's passes
    sorted_keys, order = torch.sort(keys, stable=True)
    if sparse:  # segments keyed by their rank among the touched rows: the row of `out` they go to
        starts = torch.ones_like(sorted_keys, dtype=torch.bool)
        starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
        dest = torch.cumsum(starts, 0, dtype=keys.dtype) - 1
        U = int(dest[-1]) + 1  # the one host sync: the row-sparse gradient's size
        rows = torch.empty(U, dtype=torch.int64, device=device).scatter_(0, dest.long(), sorted_keys.long())
        out = torch.empty(U, d, dtype=dtype, device=device)
        seg_keys = dest
    else:
        out = torch.empty(num_rows, d, dtype=dtype, device=device)
        _zero_untouched(out, keys)
        seg_keys = sorted_keys
    wgrad = None
    if values is not None:
        values = values if values.stride(1) == 1 else values.contiguous()
        wgrad = (sorted_keys, values, torch.empty(T * L, dtype=accumulation_dtype(dtype), device=device))
    gather = (order, weights.contiguous().reshape(-1), None, L)
    segment_reduce(seg_keys, grad_out, Epilogue(STORE.value, out), gather, wgrad)
    grad = (rows, out) if sparse else out
    return grad, None if values is None else wgrad[2].view(T, L).to(weights.dtype)
