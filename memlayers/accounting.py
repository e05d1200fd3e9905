"""Parameter and FLOP accounting: what a model stores, what a token touches, what a token costs.

Conventions (all forward, per token):

* A matmul with an (m x n) weight costs 2*m*n FLOPs; biases, norms, activations, RoPE, residual adds and
  the embedding lookup are not counted (the usual 2*N convention, as in Kaplan et al. / Chinchilla).
* Causal attention over a sequence of ``seq_len`` tokens: scores and the weighted sum of values each cost
  2*dim per attended position, and a token attends to (seq_len+1)/2 positions on average:
  ``2 * 2 * dim * (seq_len + 1) / 2 = 2 * dim * (seq_len + 1)`` per layer.
* MoE: the router (2*dim*E) plus k experts' SwiGLU (k * 6*dim*hidden).
* Memory layers: each part counts itself (``flops_per_token``: the addressing, e.g. product keys with
  every top-k comparison, Tucker scoring, or ~0 for hashing token ids; the store, the rows a token reads,
  e.g. a weighted bag 2*heads*k*value_dim, whatever the table size; the readout's projections). The
  value rows a token reads are NOT counted as a dense matmul over the table.
"""

from dataclasses import asdict, dataclass, field

from torch import nn

from .memory.layer import MemoryLayer
from .model.moe import MoE
from .model.transformer import SwiGLU
from .optim import value_parameters


def memory_flops(layer: MemoryLayer) -> int:
    """Forward FLOPs per token of a memory layer: the sum of its parts' counts (``flops_per_token``).

    For product keys (PKM, Memory, Memory+), with h heads, n sub-keys per half, top-k, key_dim d_k,
    value_dim d_v, width dim:
      query projection        2 * dim * h * d_k
      sub-key scores          2 * h * n * d_k          (both halves: 2 * n * d_k/2 multiply-adds each)
      per-half top-k          2 * h * n                (one comparison per sub-key score)
      candidate grid cells    h * C                    (one add each; C = sum_r floor(k / r) <= k (1 + ln k),
                                                        the cells of the k x k grid that can win)
      final top-k over them   h * C                    (one comparison per candidate)
      score function          3 * h * k (softmax: exp, sum, divide), h * k (relu), 0 (identity)
      weighted bag            2 * h * k * d_v          (heads*k rows read and summed)
      gate / out projections  2 * dim * d_v each, when present (Memory+ has both)
    The other kinds document their counts in their parts (README, "Memory kinds").
    """
    return layer.flops_per_token()


@dataclass
class Accounting:
    """What ``account`` returns. Parameter counts are of unique tensors (tied and shared ones count once).

    total_params: every parameter. memory_params: entries of the "values" tables (a shared pool counted once).
    embedding_params: the token embedding table (the lm head is an ordinary matmul; tied, it is this table).
    active_params: parameters a token uses in the forward pass: everything but value tables and the
    experts it is not routed to, plus the value entries each memory layer reads (``reads_per_token``).
    flops_per_token: forward FLOPs per token at ``seq_len`` (see the module docstring);
    breakdown: those FLOPs by component (keys: attention_proj, attention_scores, ffn, moe, memory,
    lm_head), summing to flops_per_token.
    """

    total_params: int
    memory_params: int
    embedding_params: int
    active_params: int
    flops_per_token: int
    seq_len: int
    breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def account(model: nn.Module, seq_len: int) -> Accounting:
    """Parameters and forward FLOPs per token of a ``memlayers.model.Transformer`` at context ``seq_len``."""
    if seq_len < 1:
        raise ValueError(f"account: seq_len must be >= 1, got {seq_len}")
    cfg = model.config
    dim = cfg.dim
    total = sum(p.numel() for p in model.parameters())
    memory_params = sum(p.numel() for p in value_parameters(model))
    flops = {"attention_proj": 0, "attention_scores": 0, "ffn": 0, "moe": 0, "memory": 0, "lm_head": 0}
    inactive, read = 0, 0
    for block in model.blocks:
        flops["attention_proj"] += 2 * block.attn.qkv.weight.numel() + 2 * block.attn.out.weight.numel()
        flops["attention_scores"] += 2 * dim * (seq_len + 1)
        if isinstance(block.ffn, SwiGLU):
            flops["ffn"] += 2 * sum(p.numel() for p in block.ffn.parameters())
        elif isinstance(block.ffn, MoE):
            m = block.ffn
            expert = 3 * m.dim * m.hidden
            flops["moe"] += 2 * m.router.weight.numel() + m.topk * 2 * expert
            inactive += (m.experts - m.topk) * expert
        if block.memory is not None:
            flops["memory"] += memory_flops(block.memory)
            read += block.memory.reads_per_token()
    flops["lm_head"] = 2 * model.lm_head.weight.numel()
    return Accounting(
        total_params=total,
        memory_params=memory_params,
        embedding_params=model.tok_emb.weight.numel(),
        active_params=total - memory_params - inactive + read,
        flops_per_token=sum(flops.values()),
        seq_len=seq_len,
        breakdown=flops,
    )
