"""Collectives along the first dim with their gradients, on torch.distributed's public API (any backend;
gloo has no reduce-scatter, so the all-gather's backward is an all-to-all and a sum, in rank order).

Every rank of ``group`` calls each, with tensors of the same shape unless counts say otherwise."""

import torch
import torch.distributed as dist


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # rank r's rows were used by every rank: the sum over ranks of each one's gradient of block r
        G = dist.get_world_size(ctx.group)
        blocks = torch.empty_like(grad)
        dist.all_to_all_single(blocks, grad.contiguous(), group=ctx.group)
        return blocks.view(G, grad.shape[0] // G, *grad.shape[1:]).sum(0), None  # no -1: T may be 0


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, send_counts, recv_counts):
        ctx.group, ctx.send_counts, ctx.recv_counts = group, send_counts, recv_counts
        rows = x.shape[0] if recv_counts is None else sum(recv_counts)
        out = x.new_empty((rows, *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # the exchange backwards: what came from rank i goes back to rank i
        return _AllToAllRows.apply(grad, ctx.group, ctx.recv_counts, ctx.send_counts), None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # every rank's output is the sum: each input's gradient is the sum of theirs
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over the ranks of ``group`` of ``x`` (any shape), differentiable (the gradient of each rank's
    ``x`` is the sum over ranks of their output gradients)."""
    return _AllReduceSum.apply(x, group)


def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """x (T, ...) on each of the G ranks -> (G*T, ...): every rank's rows, in rank order. Gradient: each
    rank's x gets the sum over ranks of the gradient of its rows."""
    return _AllGatherRows.apply(x, group)


def all_to_all_rows(x: torch.Tensor, group=None, send_counts=None, recv_counts=None) -> torch.Tensor:
    """x (G*T, ...) -> (G*T, ...): block j of x (rows j*T..(j+1)*T) goes to rank j; block i of the result
    is what rank i sent here. With ``send_counts`` and ``recv_counts`` (lists of G ints) the blocks have
    those sizes: x (sum(send_counts), ...) -> (sum(recv_counts), ...). Gradient: the same exchange,
    backwards."""
    return _AllToAllRows.apply(x, group, send_counts, recv_counts)


def send_to_owners(owner: torch.Tensor, tensors: list[torch.Tensor], group=None):
    """Entry e of each tensor (E, ...) goes to rank ``owner[e]`` (E,): -> (source (E',), [received (E', ...)]),
    what every rank sent here, grouped by the sending rank in rank order (``source``), each one's entries in
    their order there. Differentiable in the tensors (an all-to-all each, after one of the counts: a host sync).
    """
    G = dist.get_world_size(group)
    order = torch.sort(owner, stable=True).indices
    send = torch.bincount(owner, minlength=G)
    recv = all_to_all_rows(send, group, [1] * G, [1] * G)
    send, recv = send.tolist(), recv.tolist()
    received = [all_to_all_rows(t[order], group, send, recv) for t in tensors]
    source = torch.arange(G, device=owner.device).repeat_interleave(torch.tensor(recv, device=owner.device))
    return source, received
