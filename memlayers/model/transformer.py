"""A small Llama-style decoder: RMSNorm, RoPE, causal SDPA attention, SwiGLU, optional MoE and memory layers.

Usage:

    cfg = ModelConfig(vocab_size=1000, dim=128, n_layers=4,
                      memories=[MemorySpec(layers="2", options={"n_keys": 128})])
    model = Transformer(cfg)
    out = model(idx, targets)        # idx, targets (B, T) int64 -> out.logits (B, T, V), out.loss, out.aux_loss
    loss = out.loss + out.aux_loss   # aux_loss: the weighted MoE load-balancing losses (0. without MoE)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MemoryLayer
from ..values import ValueTable
from .config import ModelConfig
from .moe import MoE


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in float32: x (..., dim) -> (..., dim), x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class RoPE(nn.Module):
    """Rotary position embedding (rotate-half form): rotates channel pairs (i, i + hd/2) by pos * theta^(-2i/hd).

    The cos/sin tables (max_seq_len, head_dim/2) are non-persistent buffers (rebuilt, never saved).
    forward: x (B, H, T, head_dim) -> (B, H, T, head_dim), position t = 0..T-1.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (T_max, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)  # (T, hd/2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE, no biases: x (B, T, dim) -> (B, T, dim).

    ``qkv`` (3*dim, dim) fused projection; ``out`` (dim, dim) a residual output projection.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.dim // cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rope = RoPE(self.head_dim, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        q, k = self.rope(q), self.rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases: x (..., dim) -> (..., dim); 3*dim*hidden parameters.

    ``gate_up`` (2*hidden, dim) fuses the gate and up projections; ``down`` (dim, hidden) is a residual output.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block: ``x += attn(norm(x))``, then ``x += ffn(h) [+ memory(h)]`` with ``h = norm(x)``.

    ffn: a ``SwiGLU``, an ``MoE``, or None when a memory layer replaces it; memory: a ``MemoryLayer``
    (mode "replace": instead of the FFN; "beside": added to the FFN's output) or None.
    forward: x (B, T, dim) -> (x (B, T, dim), aux: scalar unweighted MoE load-balancing loss or None).
    """

    def __init__(self, cfg: ModelConfig, ffn: nn.Module | None, memory: MemoryLayer | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = ffn
        self.memory = memory
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.drop(self.attn(self.attn_norm(x)))
        h = self.ffn_norm(x)
        aux, out = None, None
        if isinstance(self.ffn, MoE):
            out, aux = self.ffn(h)
        elif self.ffn is not None:
            out = self.ffn(h)
        if self.memory is not None:
            m = self.memory(h)
            out = m if out is None else out + m
        return x + self.drop(out), aux


@dataclass
class ModelOutput:
    """logits (B, T, V) float; loss: scalar mean CE over targets != -100 (None without targets);
    aux_loss: scalar, the sum over MoE layers of aux_weight * load-balancing loss (0. without MoE)."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor


class Transformer(nn.Module):
    """Token embedding -> ``n_layers`` Blocks -> final RMSNorm -> lm head (tied to the embedding by default).

    Memory layers are built from ``memlayers.preset(spec.preset, dim, **spec.options)``; specs with the same
    ``pool`` name share one ``ValueTable`` (registered once, under the first layer that uses it).
    Init: every Linear/Embedding/expert weight N(0, init_std), residual output projections (attention
    ``out``, SwiGLU ``down``, expert ``down``) N(0, init_std/sqrt(2*n_layers)); memory layers keep their
    own init (the papers').
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ValueError(
                "ModelConfig.vocab_size: is None; set it (the trainer takes it from the dataset) before building "
                "the Transformer"
            )
        self.config = cfg
        moe_layers = set(cfg.moe_layers)
        placed = cfg.memory_placement()
        pools: dict[str, ValueTable] = {}
        blocks = []
        for i in range(cfg.n_layers):
            memory, mode = None, None
            if i in placed:
                s, spec = placed[i]
                mc = spec.memory_config(cfg.dim, f"memories[{s}].options")
                values = None
                if spec.pool is not None:
                    if spec.pool not in pools:
                        pools[spec.pool] = ValueTable(mc.num_values, mc.value_dim, sparse_grad=mc.sparse_values)
                    values = pools[spec.pool]
                memory, mode = MemoryLayer(mc, values), spec.mode
            if i in moe_layers:
                ffn = MoE(cfg.dim, cfg.expert_hidden, cfg.moe.experts, cfg.moe.topk)
            elif mode == "replace":
                ffn = None
            else:
                ffn = SwiGLU(cfg.dim, cfg.hidden)
            blocks.append(Block(cfg, ffn, memory))
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def _own_modules(self, module: nn.Module | None = None):
        """Every submodule except MemoryLayers and everything inside them."""
        for child in (self if module is None else module).children():
            if isinstance(child, MemoryLayer):
                continue
            yield child
            yield from self._own_modules(child)

    def reset_parameters(self) -> None:
        """Re-initialise every weight this class owns (see the class docstring); MemoryLayers are left alone."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for m in self._own_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, MoE):
                m.reset_parameters(std, out_std)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=out_std)
            if isinstance(block.ffn, SwiGLU):
                nn.init.normal_(block.ffn.down.weight, std=out_std)

    def memory_layers(self) -> list[tuple[int, MemoryLayer]]:
        """(block index, MemoryLayer) for every block that has a memory, in order."""
        return [(i, b.memory) for i, b in enumerate(self.blocks) if b.memory is not None]

    def _check_input(self, idx: torch.Tensor, targets: torch.Tensor | None) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"Transformer: idx must be a (B, T) tensor of token ids, got {shape}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Transformer: idx must be int64 (or int32) token ids, got {idx.dtype}")
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(
                f"Transformer: sequence length {T} > max_seq_len={self.config.max_seq_len}; crop the input or build "
                "the model with a larger max_seq_len"
            )
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
                shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"Transformer: targets must have idx's shape {tuple(idx.shape)}, got {shape}")
            if targets.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"Transformer: targets must be int64 token ids (-100 = ignore), got {targets.dtype}")
        # Id ranges are checked on CPU only: on CUDA the check would sync with the host every forward
        # (an out-of-range id there is a device-side assert in the embedding or the loss).
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            V = self.config.vocab_size
            for name, ids, low in (("idx", idx, 0), ("targets", targets, -100)):
                if ids is None or not ids.numel():
                    continue
                bad = (ids >= V) | (ids < 0) & (ids != low)
                if bad.any():
                    raise ValueError(
                        f"Transformer: {name} must hold token ids in [0, vocab_size={V})"
                        f"{' or -100 (ignored)' if low == -100 else ''}, got {ids[bad][0].item()}; check the "
                        "tokenizer and ModelConfig.vocab_size"
                    )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """idx (B, T) int64, targets (B, T) int64 or None (-100 = ignore) -> ModelOutput.

        The loss is the mean cross-entropy over the targets that are not -100 (0. if all are ignored),
        computed in float32.
        """
        self._check_input(idx, targets)
        x = self.drop(self.tok_emb(idx))  # (B, T, dim)
        aux_loss = torch.zeros((), device=idx.device)
        for block in self.blocks:
            x, aux = block(x)
            if aux is not None:
                aux_loss = aux_loss + self.config.moe.aux_weight * aux
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            flat = targets.reshape(-1).long()
            total = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=-100, reduction="sum"
            )
            loss = total / (flat != -100).sum().clamp_min(1)
        return ModelOutput(logits, loss, aux_loss)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: idx (B, T) -> (B, T + max_new_tokens), appending the argmax token each step.

        Runs in eval mode (restoring the previous mode), without a KV cache, on the last ``max_seq_len``
        tokens of the context.
        """
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.config.max_seq_len :]).logits  # (B, T', V)
                idx = torch.cat((idx, logits[:, -1].argmax(dim=-1, keepdim=True).to(idx.dtype)), dim=1)
        finally:
            self.train(was_training)
        return idx
