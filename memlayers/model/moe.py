"""Mixture of SwiGLU experts with token-choice top-k routing and the Switch/Mixtral load-balancing loss."""

import torch
import torch.nn.functional as F
from torch import nn


class MoE(nn.Module):
    """A drop-in for the block's SwiGLU FFN: each token is processed by k of E SwiGLU experts.

    Routing (token choice): ``p = softmax(router(x))`` over the E experts, keep each token's top k,
    renormalise those k weights to sum to 1; the output is ``sum_j w_j * expert_{e_j}(x)``.

    Dropless: there is no expert capacity, every token reaches all k of its experts, so nothing is
    dropped and a token's output never depends on the other tokens of the batch (the model stays causal
    and batch-independent). The cost is uneven per-expert work, which is fine for the sizes here.

    Dispatch sorts the T*k (token, expert) slots by expert and runs each expert once, as two batched
    matmuls, on its contiguous slice: no per-token Python loop; E small matmuls per call. Reading the
    per-expert slot counts is one host sync per MoE layer per forward (fine on CPU; on a GPU a grouped
    matmul would avoid it).

    Load balancing (Switch Transformer / Mixtral): ``aux = E * sum_e f_e * P_e`` with f_e the fraction of
    the T*k slots routed to expert e (not differentiable) and P_e the mean router probability of e. It is
    1.0 for perfectly uniform routing and grows as routing collapses; ``forward`` returns it unweighted.

    Args:
        dim: model width; hidden: per-expert SwiGLU hidden width; experts: E; topk: k.

    Parameters: ``router`` (E, dim); ``gate_up`` (E, dim, 2*hidden): the fused SwiGLU gate and up
    projections; ``down`` (E, hidden, dim). An expert has 3*dim*hidden parameters.
    """

    def __init__(self, dim: int, hidden: int, experts: int, topk: int):
        super().__init__()
        if not 1 <= topk <= experts:
            raise ValueError(f"MoE: topk must be in [1, experts={experts}], got {topk}")
        self.dim, self.hidden, self.experts, self.topk = dim, hidden, experts, topk
        self.router = nn.Linear(dim, experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(experts, dim, 2 * hidden))
        self.down = nn.Parameter(torch.empty(experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Router and expert inputs N(0, std); the expert output projections N(0, out_std or std)."""
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=std if out_std is None else out_std)

    def route(self, x: torch.Tensor):
        """x (T, dim) -> probs (T, E) (float32 at least), weights (T, k) summing to 1, experts (T, k) int64."""
        logits = self.router(x)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # >= float32
        weights, experts = probs.topk(self.topk, dim=-1)
        return probs, weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., dim) -> (y (..., dim), aux: scalar float32 load-balancing loss, unweighted)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.dim)  # (T, dim)
        T, k, E = x.shape[0], self.topk, self.experts
        probs, weights, experts = self.route(x)
        flat = experts.flatten()  # (T*k,) slot s = token s // k, its (s % k)-th choice
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, in token order within an expert
        token = order // k  # (T*k,) the token of each sorted slot
        counts = torch.bincount(flat, minlength=E)  # (E,) slots per expert
        xs = x[token]  # (T*k, dim)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = (xs[start : start + n] @ self.gate_up[e]).chunk(2, dim=-1)  # (n, hidden) each
                outs.append((F.silu(gate) * up) @ self.down[e])  # (n, dim)
            start += n
        ys = torch.cat(outs) if outs else xs  # (T*k, dim), slots sorted by expert
        ys = ys * weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
        y = torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))  # (T, dim)
        f = counts.to(probs.dtype) / max(T * k, 1)
        aux = E * (f * probs.mean(dim=0)).sum() if T else probs.new_zeros(())
        return y.reshape(*lead, self.dim), aux

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, experts={self.experts}, topk={self.topk}"
