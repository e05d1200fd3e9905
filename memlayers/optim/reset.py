"""Forget what an optimizer knows about some entries of a parameter (after the entries were re-initialised)."""

import torch

FIRST_MOMENTS = ("exp_avg", "momentum_buffer")  # Adam's, SGD's: zeroed; other per-entry state is a scale


@torch.no_grad()
def reset_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Reset the optimizer's per-entry state of ``param`` where ``where`` is True, as for fresh entries among
    trained ones: first moments (``exp_avg``, ``momentum_buffer``) become 0; scale state (Adam's ``exp_avg_sq``,
    Adagrad's ``sum``, ...) becomes the mean of the entries kept along ``where``'s last dim. (Zeroing a second
    moment too would give a reset entry several times the lr for hundreds of steps once Adam's bias
    correction has run out; a dead entry's own decayed one likewise.)

    where: bool, broadcastable from the left to ``param``'s shape, e.g. (H, 2, n) for sub-keys (H, 2, n, d).
    State of another shape (Adam's step count, a row-sparse optimizer's per-row state) is left as it is. Works
    for any torch optimizer and ``CombinedOptimizer``; a parameter without state yet is fine.
    """
    extra = param.dim() - where.dim()
    mask = where.reshape(*where.shape, *[1] * extra)
    axis = where.dim() - 1
    for name, value in optimizer.state.get(param, {}).items():
        if not (isinstance(value, torch.Tensor) and value.shape == param.shape):
            continue
        if name in FIRST_MOMENTS:
            value.masked_fill_(mask, 0)
            continue
        kept = (~mask).to(value.dtype)
        mean = (value * kept).sum(axis, keepdim=True) / kept.sum(axis, keepdim=True).clamp_min(1)
        value.copy_(torch.where(mask, mean, value))
