"""The bag's value update in plain PyTorch: the row gradients of the touched rows, then the row-wise
optimizer update of ``memlayers.ops.row_update`` (Adam, row-wise Adagrad or SGD) on those rows.

    g_r = sum_{e: ids[e] = r} weights[e] * src[src_rows[e]]

Entries are sorted by row (stable), and each touched row's gradient is a segment sum computed by
``F.embedding_bag`` over ``src`` with offsets (as ``embedding_bag.reference.value_row_grads`` does), in
float32. The update math is ``row_update.reference``'s, written here with tensor-valued learning rate
and step (``lr``/``step`` may be 0-dim device tensors); the results are stored in each tensor's dtype,
rounded to nearest or, for a bfloat16 table, stochastically. This is the function the Triton kernel
is checked against: keep it simple and obviously right.
"""

import math

import torch
import torch.nn.functional as F

from ..embedding_bag.reference import sort_ids
from ..row_update.reference import ROW_CHUNK_ELEMENTS


def adam_step_size(lr, beta1: float, beta2: float, step):
    """``lr * sqrt(1 - beta2**step) / (1 - beta1**step)``: a Python float when lr and step are numbers, else
    a 0-dim float32 tensor on their device, computed there in float64 (no host sync)."""
    if isinstance(step, torch.Tensor):
        t = step.double()
        factor = torch.sqrt(1 - beta2**t) / (1 - beta1**t)
    else:
        factor = math.sqrt(1 - beta2**step) / (1 - beta1**step)
    if isinstance(lr, torch.Tensor):
        return (lr.double() * factor).float()
    return (lr * factor).float() if isinstance(factor, torch.Tensor) else lr * factor


def row_grads(ids: torch.Tensor, weights: torch.Tensor, src_rows: torch.Tensor, src: torch.Tensor):
    """ids (E,), weights (E,), src_rows (E,), src (S, d) -> rows (U,) sorted unique int64, grads (U, d) float32.

    Each row's entries are summed in their order in ``ids``."""
    order = sort_ids(ids)[1]
    rows, counts = torch.unique_consecutive(ids[order].long(), return_counts=True)
    offsets = torch.cumsum(counts, 0) - counts
    grads = F.embedding_bag(
        src_rows.long()[order], src.float(), offsets, per_sample_weights=weights[order].float(), mode="sum"
    )
    return rows, grads


def weight_grads(param: torch.Tensor, ids: torch.Tensor, src_rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dw[e] = <src[src_rows[e]], param[ids[e]]>: (E,) float32, gathered in chunks of entries."""
    E, d = ids.numel(), param.shape[1]
    out = torch.empty(E, dtype=torch.float32, device=param.device)
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, d))
    for start in range(0, E, step):
        sl = slice(start, start + step)
        out[sl] = (param[ids[sl].long()].float() * src[src_rows[sl].long()].float()).sum(1)
    return out


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 x -> bfloat16, to the neighbour away from zero with probability equal to the dropped
    fraction of an ulp, else towards zero: 16 uniform random bits added below bf16's mantissa, then
    dropped. Unbiased; NaN stays NaN."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    bits = (x.view(torch.int32) + noise) & -(1 << 16)  # int32 wraps only for NaN payloads, kept below
    return torch.where(x.isnan(), x, bits.view(torch.float32)).to(torch.bfloat16)


@torch.no_grad()
def bag_update_reference(
    param: torch.Tensor,
    state: dict,
    ids: torch.Tensor,
    weights: torch.Tensor,
    src_rows: torch.Tensor,
    src: torch.Tensor,
    rule: str,
    *,
    lr,
    step=None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    stochastic_rounding: bool = False,
    seed=None,
    weight_grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``memlayers.ops.bag_update`` in plain PyTorch (inputs already checked): updates ``param`` and
    ``state`` in place on the touched rows, returns the 0-dim float32 sum of g_r·g_r over them.

    ``seed`` (int or 0-dim int64 tensor, read on the host) seeds the ``torch.Generator`` of the
    stochastic rounding; its bits differ from the Triton kernel's.
    """
    if weight_grad_out is not None:
        weight_grad_out.copy_(weight_grads(param, ids, src_rows, src))
    if ids.numel() == 0 or param.shape[1] == 0:
        return torch.zeros((), dtype=torch.float32, device=param.device)
    rows, g = row_grads(ids, weights, src_rows, src)
    p = param.index_select(0, rows).float()
    if rule == "sgd":
        p = p - lr * g
    elif rule == "adagrad":
        s = state["sum_sq"].index_select(0, rows).float() + g.square().mean(1)
        state["sum_sq"].index_copy_(0, rows, s.to(state["sum_sq"].dtype))
        p = p - lr * (g / (s.sqrt() + eps)[:, None])
    else:
        m = state["exp_avg"].index_select(0, rows).float().lerp_(g, 1 - beta1)
        v = state["exp_avg_sq"].index_select(0, rows).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, m.to(state["exp_avg"].dtype))
        state["exp_avg_sq"].index_copy_(0, rows, v.to(state["exp_avg_sq"].dtype))
        p = p - adam_step_size(lr, beta1, beta2, step) * (m / (v.sqrt() + eps))
    if stochastic_rounding:
        generator = torch.Generator(param.device).manual_seed(int(seed))
        new = stochastic_round_bf16(p, generator)
    else:
        new = p.to(param.dtype)
    param.index_copy_(0, rows, new)
    return g.square().sum()
