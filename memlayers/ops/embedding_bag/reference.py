"""Weighted embedding bag in plain PyTorch, with its own autograd.

    out[t] = sum_l weights[t, l] * values[indices[t, l]]

Forward is ``F.embedding_bag``. Backward is written here because torch's per-sample-weights
backward is missing for bf16 on CUDA, because we want row-sparse value gradients, and because
neither gradient should ever hold a ``(T, L, d)`` tensor:

* value gradient, the reverse-index ("CSR transpose") form: sort the T*L entries by row, and
  the gradient of each touched row is itself an embedding bag over ``grad_out``:
  ``dV[r] = sum_{(t,l): indices[t,l]=r} weights[t,l] * grad_out[t]``;
* weight gradient ``dw[t, l] = <grad_out[t], values[indices[t, l]]>``, computed over chunks of
  tokens so the gathered rows never exceed ``_CHUNK_ELEMENTS``.

All accumulation is in float32 (float64 inputs stay float64). This is the function the GPU
kernels are checked against: keep it simple and obviously right.
"""

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 22  # gathered elements per chunk in the weight gradient (16 MiB in fp32)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def bag_forward(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values (N, d), indices (T, L), weights (T, L) -> (T, d) in values.dtype."""
    T, L = indices.shape
    if T == 0 or L == 0:
        return values.new_zeros(T, values.shape[1])
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")


def value_row_grads(indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor):
    """Gradient of the touched value rows only.

    indices (T, L), weights (T, L), grad_out (T, d) -> rows (U,) sorted unique row ids,
    row_grads (U, d) in the accumulation dtype.
    """
    acc = _accumulation_dtype(grad_out.dtype)
    L = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows, counts = torch.unique_consecutive(flat[order], return_counts=True)
    offsets = torch.cumsum(counts, 0) - counts  # start of each row's entries in `order`
    token_of_entry = torch.div(order, L, rounding_mode="floor")
    row_grads = F.embedding_bag(
        token_of_entry,
        grad_out.to(acc),
        offsets,
        per_sample_weights=weights.reshape(-1)[order].to(acc),
        mode="sum",
    )
    return rows, row_grads


def weight_grad(values: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """dw[t, l] = <grad_out[t], values[indices[t, l]]>: (T, L) in float32, float64 if either input is
    (also ``memlayers.ops.gather_dot``'s reference forward: the same function)."""
    acc = torch.promote_types(torch.promote_types(values.dtype, grad_out.dtype), torch.float32)
    T, L = indices.shape
    d = values.shape[1]
    out = torch.empty(T, L, dtype=acc, device=values.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, L * d))
    for start in range(0, T, step):
        rows = values[indices[start : start + step]].to(acc)  # (chunk, L, d)
        g = grad_out[start : start + step].to(acc).unsqueeze(-1)  # (chunk, d, 1)
        out[start : start + step] = torch.bmm(rows, g).squeeze(-1)
    return out


class EmbeddingBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights, sparse_grad: bool):
        ctx.save_for_backward(values, indices, weights)
        ctx.sparse_grad = sparse_grad
        return bag_forward(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        grad_values = grad_weights = None
        empty = indices.numel() == 0
        if ctx.needs_input_grad[2]:
            if empty:
                grad_weights = torch.zeros_like(weights)
            else:
                grad_weights = weight_grad(values, indices, grad_out).to(weights.dtype)
        if ctx.needs_input_grad[0]:
            if empty:
                rows = indices.new_zeros(0)
                row_grads = values.new_zeros(0, values.shape[1])
            else:
                rows, row_grads = value_row_grads(indices, weights, grad_out)
            row_grads = row_grads.to(values.dtype)
            if ctx.sparse_grad:
                grad_values = torch.sparse_coo_tensor(
                    rows.unsqueeze(0), row_grads, values.shape, is_coalesced=True, check_invariants=False
                )
            else:
                grad_values = values.new_zeros(values.shape).index_copy_(0, rows, row_grads)
        return grad_values, None, grad_weights, None


def embedding_bag_reference(values, indices, weights, sparse_grad: bool = False) -> torch.Tensor:
    """values (N, d), indices (T, L) int, weights (T, L) -> (T, d), differentiable in values and weights."""
    return EmbeddingBagFunction.apply(values, indices, weights, sparse_grad)
