"""Weighted embedding bag in plain PyTorch, with its own autograd.

    out[t] = sum_l weights[t, l] * values[indices[t, l]]

Forward is ``F.embedding_bag``. Backward is written here because torch's per-sample-weights
backward is missing for bf16 on CUDA, because we want row-sparse value gradients, and because
neither gradient should ever hold a ``(T, L, d)`` tensor:

* value gradient, the reverse-index ("CSR transpose") form: sort the T*L entries by row (a stable
  sort: each row sums its entries in token order, so the result is deterministic), and the gradient
  of each touched row is itself an embedding bag over ``grad_out``:
  ``dV[r] = sum_{(t,l): indices[t,l]=r} weights[t,l] * grad_out[t]``;
* weight gradient ``dw[t, l] = <grad_out[t], values[indices[t, l]]>``: one dot product per entry by
  torch's own embedding-bag per-sample-weights backward when the table is in the accumulation dtype
  (float32/float64); a 16-bit table is gathered over chunks of tokens, converted to float32, so the
  gathered rows never exceed ``_CHUNK_ELEMENTS``.

*Keyed* bags (``bags`` given): entry (t, l) is added into output row ``bags[t, l]`` of ``num_bags``
instead of row t, ``out[b] = sum_{(t,l): bags[t,l]=b} weights[t, l] * values[indices[t, l]]``. The forward
sorts the entries by bag (stably) and bags them with offsets; both gradients take an entry's output
gradient from row ``bags[t, l]``.

All accumulation is in float32 (float64 inputs stay float64). This is the function the GPU
kernels are checked against: keep it simple and obviously right.
"""

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 22  # gathered elements per chunk in a 16-bit table's weight gradient (16 MiB in fp32)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def bag_forward(values, indices, weights, bags: torch.Tensor | None = None, num_bags: int = 0) -> torch.Tensor:
    """values (N, d), indices (T, L), weights (T, L) -> (T, d) in values.dtype; keyed by ``bags`` (T, L) in
    [0, num_bags): (num_bags, d)."""
    if bags is not None:
        return _keyed_bag_forward(values, indices, weights, bags, num_bags)
    T, L = indices.shape
    if T == 0 or L == 0:
        return values.new_zeros(T, values.shape[1])
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")


def check_ids(op: str, name: str, ids: torch.Tensor | None, bound: int) -> None:
    """Refuse ids outside [0, bound) (kernels that read rows without bounds checks call this first)."""
    if ids is not None and ids.numel():
        lo, hi = torch.aminmax(ids)
        if lo < 0 or hi >= bound:
            raise IndexError(f"{op}: {name} must be in [0, {bound}), got [{lo}, {hi}]")


def _narrow(ids: torch.Tensor, bound: int | None) -> torch.Tensor:
    """ids as int32 when every id is below ``bound`` and that fits (int32 sorts ~2x faster on CPU)."""
    return ids.int() if bound is not None and bound <= torch.iinfo(torch.int32).max else ids


RADIX_SORT_MIN = 32768  # torch sorts a 1-D integer CPU tensor of this many elements by a parallel radix sort


def sort_ids(ids: torch.Tensor, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(ids, stable=True)`` of ids (n,) (int32 when ``bound`` fits, see ``_narrow``): (sorted, order).

    On CPU torch sorts fewer than 32,768 integers by ``std::stable_sort``, ~4x slower than its radix sort of
    32,768 (1.4 vs 0.37 ms at 24,576 int32 ids on 2 cores): from 8,192 ids up the ids are padded with the dtype's
    largest value to 32,768, which the stable sort puts after every id, and the padding is cut off again."""
    ids = _narrow(ids, bound)
    n = ids.numel()
    if ids.device.type != "cpu" or not 8192 <= n < RADIX_SORT_MIN:
        return torch.sort(ids, stable=True)
    padding = ids.new_full((RADIX_SORT_MIN - n,), torch.iinfo(ids.dtype).max)
    sorted_ids, order = torch.sort(torch.cat([ids, padding]), stable=True)
    return sorted_ids[:n], order[:n]


def _bag_of_entry(indices: torch.Tensor, bags: torch.Tensor | None) -> torch.Tensor:
    """The output row (T*L,) each entry adds into: ``bags`` flattened, or t for a plain bag."""
    if bags is not None:
        return bags.reshape(-1)
    return torch.div(torch.arange(indices.numel(), device=indices.device), indices.shape[1], rounding_mode="floor")


def _keyed_bag_forward(values, indices, weights, bags: torch.Tensor, num_bags: int) -> torch.Tensor:
    sorted_bags, order = sort_ids(bags.reshape(-1), num_bags)
    if sorted_bags.numel() and (sorted_bags[0] < 0 or sorted_bags[-1] >= num_bags):
        raise IndexError(f"embedding_bag: bags must be in [0, {num_bags}), got [{sorted_bags[0]}, {sorted_bags[-1]}]")
    starts = torch.searchsorted(sorted_bags, torch.arange(num_bags, dtype=sorted_bags.dtype, device=bags.device))
    ids, w = indices.reshape(-1).index_select(0, order), weights.reshape(-1).index_select(0, order)
    return F.embedding_bag(ids, values, starts, per_sample_weights=w.to(values.dtype), mode="sum")


def _entries_by_row(indices, weights, grad_out, num_rows: int | None = None, bags: torch.Tensor | None = None):
    """The T*L entries sorted by row, stably (each row sums its entries in token order: deterministic).

    Returns their rows (T*L,) ascending (int32 when ``num_rows``, the table's, fits), the output rows they
    were added into (T*L,) (tokens, or ``bags``), weights (T*L,) and grad_out, these two in the accumulation
    dtype.
    """
    acc = _accumulation_dtype(grad_out.dtype)
    sorted_rows, order = sort_ids(indices.reshape(-1), num_rows)
    if bags is None:
        outputs = torch.div(order, indices.shape[1], rounding_mode="floor")
    else:
        outputs = bags.reshape(-1).index_select(0, order)
    return sorted_rows, outputs, weights.reshape(-1).index_select(0, order).to(acc), grad_out.to(acc)


def value_row_grads(indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, bags=None):
    """Gradient of the touched value rows only.

    indices (T, L), weights (T, L), grad_out (T, d) (or (num_bags, d) with ``bags`` (T, L)) -> rows (U,)
    sorted unique row ids, row_grads (U, d) in the accumulation dtype.
    """
    sorted_rows, outputs, w, g = _entries_by_row(indices, weights, grad_out, bags=bags)
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # of each row's entries
    return rows, F.embedding_bag(outputs, g, starts, per_sample_weights=w, mode="sum")


def value_grad(indices, weights, grad_out, num_rows: int, bags: torch.Tensor | None = None) -> torch.Tensor:
    """The whole value gradient: indices (T, L), weights (T, L), grad_out (T, d) (or (num_bags, d) with
    ``bags`` (T, L)) -> (num_rows, d) in the accumulation dtype, ``value_row_grads`` scattered into zeros;
    made as one bag per table row (untouched rows are empty bags), without the zero fill and the copy."""
    sorted_rows, outputs, w, g = _entries_by_row(indices, weights, grad_out, num_rows, bags)
    starts = torch.searchsorted(sorted_rows, torch.arange(num_rows, dtype=sorted_rows.dtype, device=sorted_rows.device))
    return F.embedding_bag(outputs, g, starts, per_sample_weights=w, mode="sum")


def weight_grad(values: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor, bags=None) -> torch.Tensor:
    """dw[t, l] = <grad_out[t], values[indices[t, l]]> (``grad_out[bags[t, l]]`` with ``bags``): (T, L) in
    float32, float64 if either input is (also ``memlayers.ops.gather_dot``'s reference forward)."""
    acc = torch.promote_types(torch.promote_types(values.dtype, grad_out.dtype), torch.float32)
    T, L = indices.shape
    d = values.shape[1]
    if values.dtype == acc and T * L > 0:  # one dot product per entry, nothing gathered
        flat = indices.reshape(-1).long()
        check_ids("weight_grad", "indices", flat, values.shape[0])  # torch's kernel would read outside the table
        bag_starts = torch.arange(0, T * L, L, device=flat.device)  # unused by torch when entries name their bags
        dw = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out.to(acc), values, flat, bag_starts, _bag_of_entry(indices, bags).long(), mode=0
        )  # mode 0: sum
        return dw.view(T, L)
    out = torch.empty(T, L, dtype=acc, device=values.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, L * d))
    for start in range(0, T, step):
        ids = indices[start : start + step]
        rows = values.index_select(0, ids.reshape(-1)).view(*ids.shape, d).to(acc)  # (chunk, L, d)
        if bags is None:
            g = grad_out[start : start + step].to(acc).unsqueeze(-1)  # (chunk, d, 1)
            out[start : start + step] = torch.bmm(rows, g).squeeze(-1)
        else:
            g = grad_out.index_select(0, bags[start : start + step].reshape(-1)).view(*ids.shape, d).to(acc)
            out[start : start + step] = (rows * g).sum(-1)
    return out


class EmbeddingBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights, sparse_grad: bool, bags=None, num_bags: int = 0):
        ctx.save_for_backward(values, indices, weights, bags)
        ctx.sparse_grad = sparse_grad
        return bag_forward(values, indices, weights, bags, num_bags)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights, bags = ctx.saved_tensors
        grad_values = grad_weights = None
        empty = indices.numel() == 0
        if ctx.needs_input_grad[2]:
            if empty:
                grad_weights = torch.zeros_like(weights)
            else:
                grad_weights = weight_grad(values, indices, grad_out, bags).to(weights.dtype)
        if ctx.needs_input_grad[0] and ctx.sparse_grad:
            if empty:
                rows, row_grads = indices.new_zeros(0), values.new_zeros(0, values.shape[1])
            else:
                rows, row_grads = value_row_grads(indices, weights, grad_out, bags)
            grad_values = torch.sparse_coo_tensor(
                rows.unsqueeze(0), row_grads.to(values.dtype), values.shape, is_coalesced=True, check_invariants=False
            )
        elif ctx.needs_input_grad[0]:
            grad_values = value_grad(indices, weights, grad_out, values.shape[0], bags).to(values.dtype)
        return grad_values, None, grad_weights, None, None, None


def embedding_bag_reference(values, indices, weights, sparse_grad: bool = False, bags=None, num_bags: int = 0):
    """values (N, d), indices (T, L) int, weights (T, L) -> (T, d) (with ``bags`` (T, L): (num_bags, d)),
    differentiable in values and weights."""
    return EmbeddingBagFunction.apply(values, indices, weights, sparse_grad, bags, num_bags)
