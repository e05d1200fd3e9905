"""MemoryLayer: an addressing, a value store (own or a shared pool's) and a readout."""

import inspect

import torch
from torch import nn

from ..metrics import UsageTracker
from .config import LayerConfig
from .parts import ValueStore
from .registry import preset


class MemoryLayer(nn.Module):
    """A trainable sparse key-value memory, a drop-in for (or beside) a transformer FFN.

    ``readout(store(addressing(x)), x)``: the addressing picks each token's slots and weights, the store
    reads them, the readout maps the result back to ``dim``. What the parts are is the config's kind
    (``memlayers.preset`` gives the papers' presets). Works on any input shape ``(..., dim)``.

    Args:
        config: a kind's config, e.g. ``memlayers.preset("memory_plus", 512)``.
        pool: a store to share (e.g. a Memory+ value pool), built by ``config.make_pool()``; the layer
            keeps a reference only (not a submodule, not in its ``state_dict``), so register the pool in
            the module that owns the layers (``Transformer.pools`` does); ``memlayers.build_optimizer``
            refuses a model whose layers read a pool it does not hold.

    Submodules: ``addressing``, ``store`` (unless shared), ``readout``, ``usage`` (a ``UsageTracker`` or None).
    """

    def __init__(self, config: LayerConfig, pool: ValueStore | None = None):
        super().__init__()
        if not isinstance(config, LayerConfig):
            raise TypeError(
                f"MemoryLayer: config must be a memory config (e.g. memlayers.preset(...)), got {type(config).__name__}"
            )
        self.config = c = config
        self.input_dropout = nn.Dropout(c.input_dropout)
        self.addressing = c.make_addressing()
        if pool is not None:
            self._check_pool(pool)
        store = c.make_store(pool)
        if store is pool:
            self.__dict__["store"] = pool  # a reference only: the model owns the pool
        else:
            self.store = store
        self.value_dropout = nn.Dropout(c.value_dropout)
        self.readout = c.make_readout()
        self._readout_masks = "mask" in inspect.signature(self.readout.forward).parameters  # (older readouts do not)
        a = self.addressing
        self.usage = (
            UsageTracker(a.grid, a.heads, window=c.usage_window, num_slots=a.num_slots) if c.track_usage else None
        )
        self.register_load_state_dict_pre_hook(_upgrade_legacy_keys)

    def _check_pool(self, pool) -> None:
        if not isinstance(pool, ValueStore):
            raise TypeError(
                f"MemoryLayer: pool must be a memlayers value store (config.make_pool()), got {type(pool).__name__}"
            )
        want, got = self.config.pool_signature(), pool.signature()
        differ = {k: (want[k], got.get(k)) for k in want if k != "num_slots" and want[k] != got.get(k)}
        if want.get("num_slots") is not None and got.get("num_slots", 0) < want["num_slots"]:
            differ["num_slots"] = (want["num_slots"], got.get("num_slots"))
        if differ:
            detail = ", ".join(f"{k}: the layer needs {w!r}, the pool has {g!r}" for k, (w, g) in differ.items())
            raise ValueError(
                f"MemoryLayer: the shared pool does not fit this layer ({detail}); build every layer sharing a pool "
                "with the same sizes, or build the pool with config.make_pool()"
            )

    @classmethod
    def from_preset(cls, name: str, dim: int, pool: ValueStore | None = None, **overrides) -> "MemoryLayer":
        """``MemoryLayer.from_preset("memory_plus", 512, n_keys=256)``: see ``memlayers.preset``."""
        return cls(preset(name, dim, **overrides), pool)

    @property
    def needs_token_ids(self) -> bool:
        return self.addressing.needs_token_ids

    def parts(self) -> tuple[nn.Module, ...]:
        """(addressing, store, readout): the store even when it is a shared pool's."""
        return self.addressing, self.store, self.readout

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: the parts' own counts (value rows read, never the whole table)."""
        a = self.addressing
        return a.flops_per_token() + self.store.read_flops(a.heads * a.topk) + self.readout.flops_per_token()

    def reads_per_token(self) -> int:
        """Value-table parameters a token reads (the active part of the tables)."""
        return self.store.read_params(self.addressing.heads * self.addressing.topk)

    def aux_loss(self) -> torch.Tensor | None:
        """The sum of the parts' weighted auxiliary losses (e.g. UltraMem's Tucker core penalty), or None."""
        losses = [part.aux_loss() for part in self.parts()]  # (no walrus in a comprehension: dynamo cannot trace it)
        losses = [loss for loss in losses if loss is not None]
        return sum(losses[1:], losses[0]) if losses else None

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after every optimizer step (the trainer does; a loop of your own must, or restarts never happen):
        the parts maintain themselves (dead sub-key restarts). A shared pool's store is left to its owner."""
        for part in (self.addressing, self.readout, *([self.store] if "store" in self._modules else [])):
            part.after_step(optimizer)

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None, token_ids: torch.Tensor | None) -> None:
        dim = self.config.dim
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != dim:
            raise ValueError(f"MemoryLayer: expected input of shape (..., {dim}), got {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise TypeError(f"MemoryLayer: input must be floating point, got {x.dtype}")
        param = next(self.addressing.parameters(), None)
        param = param if param is not None else next(self.readout.parameters(), None)
        if param is not None:
            if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(
                    f"MemoryLayer: input is {x.dtype} but the layer's parameters are {param.dtype}; "
                    f"call layer.to({x.dtype}), cast the input, or run under torch.autocast"
                )
            if x.device != param.device:
                raise ValueError(
                    f"MemoryLayer: input is on {x.device} but the layer is on {param.device}; "
                    f"call layer.to({x.device!s:s}) or move the input"
                )
        table = next(self.store.root().parameters(), None)
        if table is not None and table.device != x.device:
            raise ValueError(
                f"MemoryLayer: the value store is on {table.device} but the input on {x.device}; "
                "a shared pool moves with the model that owns it, so move the whole model"
            )
        if mask is not None and (mask.shape != x.shape[:-1] or mask.dtype != torch.bool):
            raise ValueError(
                f"MemoryLayer: mask must be a bool tensor of shape {tuple(x.shape[:-1])} (True = real token), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if self.needs_token_ids:
            if token_ids is None:
                raise ValueError(
                    f"MemoryLayer: {self.config.kind!r} memories are addressed by token ids; "
                    "call layer(x, token_ids=ids) "
                    f"with ids of shape {tuple(x.shape[:-1])}"
                )
            if token_ids.shape != x.shape[:-1] or token_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"MemoryLayer: token_ids must be int64 (or int32) of shape {tuple(x.shape[:-1])}, "
                    f"got {token_ids.dtype} {tuple(token_ids.shape)}"
                )

    def retrieve(self, x: torch.Tensor, mask: torch.Tensor | None = None, token_ids: torch.Tensor | None = None):
        """x (..., dim) -> ids (..., H, k) int64 slot ids, weights (..., H, k[, C]) (float32, float64 if x is)."""
        self._check_input(x, mask, token_ids)
        lead = x.shape[:-1]
        ids, weights = self.addressing(
            x.reshape(-1, self.config.dim), None if mask is None else mask.reshape(-1), token_ids
        )
        return ids.view(*lead, *ids.shape[1:]), weights.view(*lead, *weights.shape[1:])

    def prefetch(self, token_ids: torch.Tensor, state: dict | None = None) -> tuple | None:
        """Where the slots depend on the token ids alone (hashed n-grams) and the values are offloaded
        (``memlayers.serving.offload_values``), address ``token_ids`` now, before the layer's input exists, and
        start bringing the rows they read to the device; return (ids, weights), to pass to the forward on these
        tokens as ``addressed`` (``state`` has then advanced already). Otherwise None. ``Transformer.forward``
        calls this for every memory before its first block (no padding mask: its inputs have none)."""
        if not (self.addressing.ids_from_tokens and self.store.root().offloaded):
            return None
        ids, weights = self.addressing(None, None, token_ids, state)
        self.store.prefetch(ids)
        return ids, weights

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        state: dict | None = None,
        addressed: tuple | None = None,
    ) -> torch.Tensor:
        """x (..., dim) -> (..., dim).

        mask (...) bool or None: padding, kept out of BatchNorm statistics and usage metrics; n-gram memories
            treat it as outside the sequence (a left-padded sequence reads what it reads unpadded).
        token_ids (...) int64: the tokens at x's positions, for kinds addressed by token ids (engram).
        state: a dict kept across incremental decoding calls (x then holds the next positions of the
        same sequences), for kinds that look back along the sequence; None otherwise.
        addressed: what ``prefetch`` returned for these tokens (the addressing is not run again).
        """
        self._check_input(x, mask, token_ids)
        lead, dim = x.shape[:-1], self.config.dim
        x = self.input_dropout(x.reshape(-1, dim))  # (T, dim)
        flat_mask = None if mask is None else mask.reshape(-1)
        if addressed is None:
            ids, weights = self.addressing(x, flat_mask, token_ids, state)  # (T, H, k), (T, H, k[, C])
        else:
            ids, weights = addressed
        if self.usage is not None and self.training:
            self.usage.update(ids, weights.abs().sum(-1) if weights.dim() == 4 else weights, flat_mask)
        y = self.store(ids, weights, x)  # (T, d_v)
        y = self.value_dropout(y.to(x.dtype))
        masked = dict(mask=flat_mask) if self._readout_masks else {}
        return self.readout(y, x, lead, state, **masked).reshape(*lead, dim)

    def extra_repr(self) -> str:
        if "store" in self._modules:
            return f"kind={self.config.kind!r}"
        return f"kind={self.config.kind!r}, store=shared {type(self.store).__name__} (owned by the model)"


_LEGACY = (
    ("retrieval.", "addressing."),
    ("values.", "store."),
    ("gate_proj.", "readout.gate_proj."),
    ("out_proj.", "readout.out_proj."),
)


def _upgrade_legacy_keys(module, state_dict, prefix, *args) -> None:
    """Load product-key layers saved before the parts had their own modules (``retrieval``, ``values``,
    ``gate_proj``, ``out_proj`` directly under the layer)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in _LEGACY:
            if key.startswith(prefix + old) and prefix + new + key[len(prefix + old) :] not in state_dict:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
                break
