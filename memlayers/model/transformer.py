"""A small Llama-style decoder: RMSNorm, RoPE, causal SDPA attention, SwiGLU, optional MoE and memory layers.

Usage:

    cfg = ModelConfig(vocab_size=1000, dim=128, n_layers=4,
                      memories=[MemorySpec(layers="2", options={"n_keys": 128})])
    model = Transformer(cfg)
    out = model(idx, targets)        # idx, targets (B, T) int64 -> out.logits (B, T, V), out.loss, out.aux_loss
    loss = out.loss + out.aux_loss   # aux_loss: the weighted MoE load-balancing losses (0. without MoE)
    model.generate(idx, 20, temperature=0.8, top_p=0.9)  # (B, T) -> (B, T + 20), with a KV cache
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..memory.layer import MemoryLayer
from ..memory.parts import ValueStore
from ..memory.stores.ring_window import RingWindow
from .config import ModelConfig, parse_placement, parse_share
from .generation import check_sampling, sample_next
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
    forward: x (B, H, T, head_dim), start -> (B, H, T, head_dim), positions start..start+T-1.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (T_max, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = x.shape[-2]
        cos, sin = self.cos[start : start + T].to(x.dtype), self.sin[start : start + T].to(x.dtype)  # (T, hd/2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """One block's state for incremental decoding: the attention's keys and values, (B, H, max_len, head_dim)
    buffers allocated on the first ``append`` (its batch, device and dtype) and filled up to ``length``
    tokens, and ``memory``, a dict the block's memory layer may keep (e.g. engram's recent token ids)."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.memory: dict = {}

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, T, hd) of the next T positions -> all keys and values so far, (B, H, length, hd) each."""
        start, end = self.length, self.length + k.shape[2]
        if self.k is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        elif k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KVCache: batch size {k.shape[0]}, but the cache holds {self.k.shape[0]} rows")
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE, no biases: x (B, T, dim) -> (B, T, dim).

    ``qkv`` (3*dim, dim) fused projection; ``out`` (dim, dim) a residual output projection.
    With a ``KVCache`` holding ``L`` earlier tokens, x is the next T tokens (positions L..L+T-1): they
    attend to the cached keys and values and to each other causally, and are appended to the cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.dim // cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rope = RoPE(self.head_dim, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        start = 0 if cache is None else cache.length
        q, k = self.rope(q, start), self.rope(k, start)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, start + T, hd)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:  # is_causal aligns the mask top-left; new tokens need it bottom-right (query i sees keys <= start + i)
            mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
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
    """Pre-norm block: ``x += attn(norm(x))``, then ``x += ffn(h) [+ memory(m)]`` with ``h = norm(x)``.

    ffn: a ``SwiGLU``, an ``MoE``, or None when a memory layer replaces it; memory: a ``MemoryLayer``
    (mode "replace": instead of the FFN; "beside": added to the FFN's output) or None. The memory reads
    ``m = h``, or the ``memory_input`` given (an earlier block's h: UltraMem's skip-layer).
    forward: x (B, T, dim), cache (this block's KVCache or None), token_ids (B, T) (for memories addressed
    by token ids), memory_input (B, T, dim) or None, addressed (what ``MemoryLayer.prefetch`` returned, or
    None) -> (x (B, T, dim), aux: scalar unweighted MoE load-balancing loss or None, h (B, T, dim)).
    """

    def __init__(self, cfg: ModelConfig, ffn: nn.Module | None, memory: MemoryLayer | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = ffn
        self.memory = memory
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        token_ids: torch.Tensor | None = None,
        memory_input: torch.Tensor | None = None,
        addressed: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        x = x + self.drop(self.attn(self.attn_norm(x), cache))
        h = self.ffn_norm(x)
        aux, out = None, None
        if isinstance(self.ffn, MoE):
            out, aux = self.ffn(h)
        elif self.ffn is not None:
            out = self.ffn(h)
        if self.memory is not None:
            ids = token_ids if self.memory.needs_token_ids else None
            m = self.memory(
                h if memory_input is None else memory_input,
                token_ids=ids,
                state=None if cache is None else cache.memory,
                addressed=addressed,
            )
            out = m if out is None else out + m
        return x + self.drop(out), aux, h


class Pools(nn.Module):
    """The model's shared value stores by name: ``pools[name]``, ``pools.name``, ``name in pools``, iteration
    over the names, ``pools.items()``; ``state_dict`` keys ``pools.{name}.*``. (Not a ModuleDict: a pool may be
    called "values".)"""

    def __init__(self, stores: dict[str, ValueStore]):
        super().__init__()
        for name, store in stores.items():
            self.add_module(name, store)

    def __getitem__(self, name: str) -> ValueStore:
        if name not in self._modules:
            raise KeyError(f"no pool {name!r}; the model's pools: {self.names()}")
        return self._modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def names(self) -> list[str]:
        return list(self._modules)

    def items(self):
        return self._modules.items()


def read_pool(spec, block: int, n_layers: int, mc, pools: dict) -> tuple[str | None, ValueStore | None]:
    """(name, store) of the pool (or a window onto it) that ``spec``'s memory at ``block`` reads, the pool
    created in ``pools`` (name -> store) on first use, so the init draws from the RNG in build order; (None,
    None) without a pool. mc: the layer's config (``spec.memory_config``); n_layers: the model's depth."""
    if spec.pool is None:
        return None, None
    layers = parse_placement(spec.layers, n_layers)
    j, L, N = layers.index(block), len(layers), mc.num_slots
    how, arg = parse_share(spec.share)
    name, rows = spec.pool, None
    if how == "block":
        name = f"{spec.pool}_{j // arg}"
    elif how == "ring":
        rows = max(N, round(L * arg * N))
    if name not in pools:
        pools[name] = mc.make_pool(rows)
    return name, RingWindow(pools[name], round(j * arg * N), N) if how == "ring" else pools[name]


@dataclass
class ModelOutput:
    """logits (B, T, V) float; loss: scalar mean CE over targets != -100 (None without targets);
    aux_loss: scalar, the sum over MoE layers of aux_weight * load-balancing loss plus, in training mode, the
    memory layers' weighted auxiliary losses (e.g. UltraMem's Tucker core penalty); 0. without either."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor


class Transformer(nn.Module):
    """Token embedding -> ``n_layers`` Blocks -> final RMSNorm -> lm head (tied to the embedding by default).

    Memory layers are built from ``memlayers.preset(spec.preset, dim, **spec.options)`` adapted to the model
    (``LayerConfig.in_model``). Shared pools are owned here, in ``pools`` (a ``Pools`` container by pool name; with
    ``share="block:G"`` the names are ``pool_0``, ``pool_1``, ...), and read by reference by their layers.
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
        pools: dict[str, ValueStore] = {}
        self.pool_of: dict[int, str] = {}  # block -> name of the pool its memory reads
        self.memory_reads: dict[int, int] = {}  # block -> the earlier block whose FFN input its memory reads
        blocks = []
        for i in range(cfg.n_layers):
            memory, mode = None, None
            if i in placed:
                s, spec = placed[i]
                mc = spec.memory_config(cfg.dim, f"memories[{s}].options", cfg.n_layers, cfg.vocab_size)
                memory, mode = MemoryLayer(mc, self._pool_for(i, spec, mc, pools)), spec.mode
                if spec.skip:
                    self.memory_reads[i] = i - spec.skip
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
        self.pools = Pools(pools)
        self.register_load_state_dict_pre_hook(_upgrade_pool_keys)
        self.reset_parameters()

    def _pool_for(self, block: int, spec, mc, pools: dict) -> ValueStore | None:
        name, store = read_pool(spec, block, self.config.n_layers, mc, pools)
        if name is not None:
            self.pool_of[block] = name
        return store

    def _own_modules(self, module: nn.Module | None = None):
        """Every submodule except memory layers, pools and everything inside them (they keep their own init)."""
        for child in (self if module is None else module).children():
            if isinstance(child, (MemoryLayer, ValueStore)) or child is self.pools:
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

    def new_cache(self) -> list[KVCache]:
        """An empty KV cache for ``forward(idx, cache=...)``: one ``KVCache`` per block, ``max_seq_len`` long."""
        return [KVCache(self.config.max_seq_len) for _ in self.blocks]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: list[KVCache] | None = None
    ) -> ModelOutput:
        """idx (B, T) int64, targets (B, T) int64 or None (-100 = ignore) -> ModelOutput.

        The loss is the mean cross-entropy over the targets that are not -100 (0. if all are ignored),
        computed in float32. cache: ``new_cache()`` or a cache holding the L tokens before idx, which then
        has positions L..L+T-1 (L + T <= max_seq_len); its keys and values are appended to it. Memory
        layers and MoE act per token, so in eval mode the result equals one forward over the whole context.
        """
        self._check_input(idx, targets)
        if cache is not None:
            if len(cache) != len(self.blocks):
                raise ValueError(f"Transformer: cache has {len(cache)} layers, the model {len(self.blocks)}")
            if cache[0].length + idx.shape[1] > self.config.max_seq_len:
                raise ValueError(
                    f"Transformer: {cache[0].length} cached + {idx.shape[1]} new tokens > max_seq_len="
                    f"{self.config.max_seq_len}; start a new cache on the last max_seq_len tokens"
                )
        x = self.drop(self.tok_emb(idx))  # (B, T, dim)
        aux_loss = torch.zeros((), device=idx.device)
        sources = set(self.memory_reads.values())
        saved = {}  # block -> its FFN input, for the later memories that read it
        # memories that know their rows from the tokens alone address them now and start fetching offloaded rows
        addressed = [
            None if block.memory is None else block.memory.prefetch(idx, None if cache is None else cache[i].memory)
            for i, block in enumerate(self.blocks)
        ]
        for i, block in enumerate(self.blocks):
            x, aux, h = block(
                x, None if cache is None else cache[i], idx, saved.get(self.memory_reads.get(i)), addressed[i]
            )
            if i in sources:
                saved[i] = h
            if aux is not None:
                aux_loss = aux_loss + self.config.moe.aux_weight * aux
            if self.training and block.memory is not None and (extra := block.memory.aux_loss()) is not None:
                aux_loss = aux_loss + extra
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
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Decoding: idx (B, T) -> (B, T + n) with n <= max_new_tokens, appending one sampled token per step.

        temperature 0 is greedy (argmax; top_k/top_p unused); otherwise a token is drawn from
        softmax(logits / temperature) restricted to the ``top_k`` most likely tokens and to the smallest
        set whose probability reaches ``top_p`` (nucleus), with ``generator`` (on idx's device) if given.
        eos_id: rows that have produced it are padded with eos_id, and decoding stops early once every
        row has (so n < max_new_tokens is possible; the prompt's own eos tokens do not count).
        Runs in eval mode (restoring the previous mode) on the last ``max_seq_len`` tokens of the context.
        With ``use_cache`` the prompt is run once and each step runs only the new token against a KV
        cache; once the context exceeds max_seq_len, cropping shifts every position, so each step re-fills
        the cache from the cropped context (as costly as ``use_cache=False``, with the same result).
        """
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        if eos_id is not None and not 0 <= eos_id < self.config.vocab_size:
            raise ValueError(f"generate: eos_id must be in [0, vocab_size={self.config.vocab_size}), got {eos_id}")
        L = self.config.max_seq_len
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        cache = None
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = self(idx[:, -L:]).logits
                elif cache is None or cache[0].length == L:  # first step, or the context outgrew the cache
                    cache = self.new_cache()
                    logits = self(idx[:, -L:], cache=cache).logits
                else:
                    logits = self(idx[:, -1:], cache=cache).logits
                token = sample_next(logits[:, -1], temperature, top_k, top_p, generator).to(idx.dtype)  # (B,)
                if eos_id is not None:
                    token = token.masked_fill(done, eos_id)
                    done |= token == eos_id
                idx = torch.cat((idx, token[:, None]), dim=1)
                if eos_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return idx


def _upgrade_pool_keys(module, state_dict, prefix, *args) -> None:
    """Load checkpoints saved before pools were owned by the model: the first layer reading a pool held it
    as ``blocks.{i}.memory.values.weight``; it is ``pools.{name}.weight`` now."""
    for block, name in module.pool_of.items():
        old, new = f"{prefix}blocks.{block}.memory.values.weight", f"{prefix}pools.{name}.weight"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
