"""Mixture of SwiGLU experts with token-choice top-k routing and the Switch/Mixtral load-balancing loss.

The dispatch never reads routing data on the host (no ``.tolist()``, ``.item()``, ``bincount`` or
``nonzero``, no Python loop over experts), so it costs no device-to-host sync and
``torch.compile(moe, fullgraph=True)`` traces it whole, backward included.
"""

import torch
import torch.nn.functional as F
from torch import nn

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # torch >= 2.8
_BLOCKS_PER_EXPERT = 4  # padded_experts: blocks of ~slots / (4 * experts) rows (memory vs padding, see there)


class MoE(nn.Module):
    """A drop-in for the block's SwiGLU FFN: each token is processed by k of E SwiGLU experts.

    Routing (token choice): ``p = softmax(router(x))`` over the E experts, keep each token's top k,
    renormalise those k weights to sum to 1; the output is ``sum_j w_j * expert_{e_j}(x)``.

    Dropless: there is no expert capacity, every token reaches all k of its experts, so nothing is
    dropped and a token's output never depends on the other tokens of the batch (the model stays causal
    and batch-independent). The cost is uneven per-expert work, which is fine for the sizes here.

    Dispatch sorts the T*k (token, expert) slots by expert and runs every expert on its contiguous
    segment at once: a grouped GEMM where the device has one (``grouped_experts``), else one batched
    matmul over fixed-height blocks (``padded_experts``); ``expert_ffn`` picks. The segment ends are
    found on the device (a binary search in the sorted expert ids), so there is no host sync.

    Load balancing (Switch Transformer / Mixtral): ``aux = E * sum_e f_e * P_e`` with f_e the fraction of
    the T*k slots routed to expert e (not differentiable) and P_e the mean router probability of e. It is
    1.0 for perfectly uniform routing and grows as routing collapses; ``forward`` returns it unweighted. With
    ``sync_group`` set (``parallelize`` does) f and P are those of every rank's tokens.

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
        self.sync_group = None  # a process group: the balance loss over every rank's tokens (``parallelize``)
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
        sorted_experts, order = torch.sort(experts.flatten(), stable=True)  # slot s = token s // k, choice s % k
        ends = torch.searchsorted(sorted_experts, torch.arange(1, E + 1, device=x.device))  # (E,) segment ends
        gate_up, down, xs = self.gate_up, self.down, x.index_select(0, order // k)  # (T*k, dim) sorted by expert
        if torch.is_autocast_enabled(x.device.type):  # cast as autocast casts a matmul's operands
            dt = torch.get_autocast_dtype(x.device.type)
            gate_up, down, xs = gate_up.to(dt), down.to(dt), xs.to(dt)
        ys = expert_ffn(xs, ends, gate_up, down)  # (T*k, dim), sorted by expert
        ys = torch.empty_like(ys).index_copy_(0, order, ys).view(T, k, self.dim)  # back in slot order
        y = (ys * weights.unsqueeze(-1).to(ys.dtype)).sum(dim=1).to(x.dtype)  # (T, dim)
        return y.reshape(*lead, self.dim), self._balance_loss(probs, ends)

    def _balance_loss(self, probs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """probs (T, E), ends (E,) -> the load-balancing loss; with ``sync_group`` of every rank's tokens (its
        slot counts and probability sums all-reduced, differentiably): what one process holding them all gets."""
        counts = torch.diff(ends, prepend=ends.new_zeros(1)).to(probs.dtype)  # (E,) slots per expert
        stats = torch.cat([probs.sum(dim=0), counts, counts.new_full((1,), probs.shape[0])])  # (2E + 1,)
        if self.sync_group is not None and self.training:
            from ..distributed.collectives import all_reduce_sum

            stats = all_reduce_sum(stats, self.sync_group)
        E, T = self.experts, stats[-1].clamp_min(1)  # (no tokens: every sum is 0, so is the loss)
        return E * (stats[E : 2 * E] / (T * self.topk) * stats[:E] / T).sum()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, experts={self.experts}, topk={self.topk}"


def expert_ffn(xs: torch.Tensor, ends: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Every expert's SwiGLU on its segment of the expert-sorted slots, by the fastest sync-free way here.

    xs (M, dim) slots sorted by expert; ends (E,) int, ends[e] = end of expert e's segment (ends[-1] = M);
    gate_up (E, dim, 2*hidden); down (E, hidden, dim) -> (M, dim). ``grouped_experts`` where
    ``grouped_mm_ok`` says the grouped GEMM runs without a host sync, else ``padded_experts``.
    """
    if grouped_mm_ok(xs, gate_up, down):
        return grouped_experts(xs, ends, gate_up, down)
    return padded_experts(xs, ends, gate_up, down)


def grouped_mm_ok(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether ``grouped_experts`` runs here with neither a host sync nor a graph break.

    On CUDA, torch has a grouped kernel only for bf16 on sm_90 and sm_100; elsewhere (and on ROCm) it
    loops over the groups after copying the offsets to the host, a sync. sm_100 is left out too: its
    kernel gives experts without tokens non-zero weight gradients (pytorch/pytorch#172439). On CPU it
    runs fp32/fp16/bf16, but when tracing (torch.compile) its shape function accepts only bf16. Row
    strides must be 16-byte aligned: dim and hidden multiples of 16 / element size.
    """
    dtype, device = xs.dtype, xs.device
    if _GROUPED_MM is None or gate_up.dtype != dtype or down.dtype != dtype:
        return False
    align = 16 // xs.element_size()
    if xs.shape[-1] % align or down.shape[1] % align:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.version.hip is None and _cuda_sm90(device.index)
    if device.type == "cpu":
        traceable = dtype == torch.bfloat16 or not torch.compiler.is_compiling()
        return dtype in (torch.float32, torch.float16, torch.bfloat16) and traceable
    return False


@torch.compiler.assume_constant_result
def _cuda_sm90(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def grouped_experts(xs: torch.Tensor, ends: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``expert_ffn`` as two grouped GEMMs (``torch.nn.functional.grouped_mm``); shapes as there.

    One kernel per projection for all experts; the segment ends stay on the device. Needs
    ``grouped_mm_ok``.
    """
    offs = ends.to(torch.int32)
    gate, up = _GROUPED_MM(xs, gate_up, offs=offs).chunk(2, dim=-1)  # (M, hidden) each
    return _GROUPED_MM(F.silu(gate) * up, down, offs=offs)


def padded_experts(
    xs: torch.Tensor, ends: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, block: int | None = None
) -> torch.Tensor:
    """``expert_ffn`` as two batched matmuls over fixed-height blocks; shapes as there; any dtype/device.

    Each expert's segment is laid out from a multiple of ``block`` (B) rows, zero-padded, so every block
    of B rows belongs to one expert; each block is multiplied by its expert's weights, gathered per block
    (one ``bmm`` per projection). All shapes are static: nb = (M + E*(B-1)) // B blocks, enough for any
    routing; blocks past the last used one are zeros given the last expert's weights. Padding rows are
    zero, so they add nothing to any gradient.

    Cost, with the default B (the power of two >= M / (4E), at least 8): nb <= M/B + E <= 5E blocks, so
    the per-block weight copies (saved for the backward) take at most 5x the experts' weights; the padding
    is under max(M/2 + 2E, 8E) rows, so at most ~1.5x the grouped GEMM's FLOPs for M >> E.
    """
    M, dim = xs.shape
    E = ends.shape[0]
    B = block or _block_rows(M, E)
    nb = (M + E * (B - 1)) // B
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    blocks = (counts + B - 1) // B  # (E,) blocks of each expert
    block_end = blocks.cumsum(0)  # (E,)
    slot = torch.arange(M, device=xs.device)
    e = torch.searchsorted(ends, slot, right=True)  # (M,) expert of each sorted slot
    row = (block_end - blocks)[e] * B + slot - (ends - counts)[e]  # (M,) padded row of each slot
    block_expert = torch.searchsorted(block_end, torch.arange(nb, device=xs.device), right=True).clamp_(max=E - 1)
    xp = xs.new_zeros(nb * B, dim).index_copy(0, row, xs).view(nb, B, dim)
    gate, up = torch.bmm(xp, gate_up.index_select(0, block_expert)).chunk(2, dim=-1)  # (nb, B, hidden) each
    return torch.bmm(F.silu(gate) * up, down.index_select(0, block_expert)).view(nb * B, dim).index_select(0, row)


def _block_rows(slots: int, experts: int) -> int:
    """``padded_experts``' default block height: the power of two >= slots / (4 * experts), at least 8."""
    target = -(-slots // (_BLOCKS_PER_EXPERT * experts))
    return max(8, 1 << max(target - 1, 0).bit_length())


def moe_reference(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe(x)`` by its definition, expert by expert (host syncs and all): the reference for tests.

    x (..., dim) -> (y (..., dim), aux scalar).
    """
    flat = x.reshape(-1, moe.dim)
    logits = flat @ moe.router.weight.T
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # (T, E)
    top, chosen = probs.topk(moe.topk, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    y = torch.zeros_like(flat)
    for e in range(moe.experts):
        token, j = (chosen == e).nonzero(as_tuple=True)
        gate, up = (flat[token] @ moe.gate_up[e]).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ moe.down[e]
        y = y.index_add(0, token, out * top[token, j].unsqueeze(-1).to(out.dtype))
    f = F.one_hot(chosen, moe.experts).sum(dim=(0, 1)).to(probs.dtype) / max(chosen.numel(), 1)
    aux = moe.experts * (f * probs.mean(dim=0)).sum() if flat.shape[0] else probs.new_zeros(())
    return y.reshape(x.shape), aux
