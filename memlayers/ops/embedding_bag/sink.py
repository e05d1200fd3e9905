"""The bag with its value gradient handed to a sink: what the fused optimizer update reads.

Forward as ``embedding_bag``. Backward: the weight gradient as usual (``memlayers.ops.gather_dot``, the same
function as the bag's weight gradient), but instead of a value gradient the bag's own backward inputs
``(indices, weights, grad_out)`` go to ``sink``, which applies the update straight from them
(``memlayers.ops.bag_update``). ``values`` gets an empty row-sparse gradient, so that autograd still runs
its accumulation node and the post-accumulate-grad hooks there: the signal that every reader of the table
in this backward pass has handed over its part (``memlayers.optim.FusedRowOptimizer``).
"""

import torch


class SinkBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights, sink, impl: str):
        from . import embedding_bag

        ctx.save_for_backward(values, indices, weights)
        ctx.sink, ctx.impl = sink, impl
        return embedding_bag(values, indices, weights, impl=impl)

    @staticmethod
    def backward(ctx, grad_out):
        from ..gather_dot import gather_dot

        values, indices, weights = ctx.saved_tensors
        grad_weights = None
        if ctx.needs_input_grad[2]:
            grad_weights = gather_dot(values, indices, grad_out, impl=ctx.impl).to(weights.dtype)
        ctx.sink(indices, weights, grad_out)
        empty = torch.sparse_coo_tensor(
            indices.new_zeros(1, 0, dtype=torch.int64), values.new_zeros(0, values.shape[1]), values.shape,
            is_coalesced=True, check_invariants=False,
        )  # fmt: skip
        return empty, None, grad_weights, None, None
