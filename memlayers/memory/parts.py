"""The three parts a memory layer is made of, and what each part tells the rest of the library.

A memory layer is ``readout(store(addressing(x)), x)``:

* ``Addressing``: x (T, dim) [and token ids (T,)] -> slot ids (T, H, k) int64 and weights (T, H, k)
  (or (T, H, k, C): C weights per slot, one per score core);
* ``ValueStore``: (ids, weights, x) -> (T, d_v); owns the big table(s). The one seam that is shared
  between layers, sharded, fused with an optimizer or moved off the GPU: such things wrap a store;
* ``Readout``: (y (T, d_v), x (T, dim)) -> (T, dim).

Optimizer groups, accounting and usage metrics ask the parts (``param_roles``, ``flops_per_token`` and
the store's ``read_flops``/``read_params``, the addressing's slot layout); nothing checks which kind of part it holds.
"""

import torch
from torch import nn

ROLES = ("keys", "values", "dense")


class MemoryPart(nn.Module):
    """What every part answers.

    param_roles(): {role: [parameters]} over this part's own parameters, roles from ``ROLES``:
        "keys"   addressing tables (sub-keys, Tucker keys): base lr, no weight decay;
        "values" the large tables a token reads a few rows of: the value lr, no weight decay, clipped
                 apart from the rest, eligible for the row-sparse optimizers;
        "dense"  everything else (AdamW: decay on matrices, none on vectors).
        Default: every parameter "dense".
    flops_per_token(): forward FLOPs per token, by ``memlayers.accounting``'s conventions.
    aux_loss(): a weighted auxiliary loss to add to the training loss, or None.
    after_step(optimizer): called after every optimizer step (e.g. to restart dead sub-keys and reset their
        optimizer state); default nothing.
    one_process_only: why the part cannot train on several processes (``parallelize`` refuses it), or None.
    reset_buffers(): set the buffers kept out of ``state_dict`` (``persistent=False``) to what the constructor
        makes, after the module was built on the meta device and its saved tensors loaded (transformers'
        ``from_pretrained``); a part keeping such buffers must define it. Default nothing.
    bind_tokenizer(decode): see below.
    """

    one_process_only: str | None = None

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"dense": list(self.parameters())}

    def flops_per_token(self) -> int:
        return 0

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        pass

    def reset_buffers(self) -> None:
        pass

    def bind_tokenizer(self, decode) -> None:
        """Called with the training data's ``decode(ids) -> text`` before training (engram folds tokens that
        read alike); most parts ignore it."""


class Addressing(MemoryPart):
    """Chooses the slots a token reads.

    Attributes every addressing sets:
        heads, topk: each token reads heads*topk slots, returned as (T, heads, topk);
        num_slots: slot ids are in [0, num_slots);
        grid: n when slot ids are product-structured ``i*n + j`` (per-half sub-key usage metrics), else None;
        needs_token_ids: True when forward needs the token ids (hashed n-grams);
        ids_from_tokens: True when the ids depend on the token ids (and decoding state) alone, not on x, so that
            they are known before the layer's input is (forward then takes x=None): offloaded rows are prefetched.
    forward(x (T, dim), mask (T,) bool or None, token_ids (...) int64 or None, state dict or None)
        -> ids (T, heads, topk) int64, weights (T, heads, topk) or (T, heads, topk, C).
        token_ids has the layer input's leading shape (e.g. (B, S), T = B*S) so that an addressing can look
        back along the sequence; state is kept across incremental decoding calls (None otherwise). What a part
        keeps in ``state`` holds one row per sequence along dim 0 (beam search reorders its tensors so).
    """

    needs_token_ids = False
    ids_from_tokens = False


class ValueStore(MemoryPart):
    """Holds the values and reads them.

    Attributes: num_slots (ids are in [0, num_slots)), out_dim (width of what forward returns),
    sparse_grad (its "values" parameters get row-sparse gradients), lr_decay ((start, fraction): the
    value lr starts at ``start`` times its peak and falls linearly to 1x over the first ``fraction`` of
    training; None: constant).
    forward(ids (T, H, k), weights (T, H, k[, C]), x (T, dim)) -> (T, out_dim).
    read_params(reads): parameters of "values" tables a token reads when it reads ``reads`` slots.
    read_flops(reads): forward FLOPs per token for ``reads`` slots (a store's ``flops_per_token``).
    signature(): what layers sharing this store must agree on (shown in errors).
    root(): the store that holds the tables: itself, or for a wrapper (a window, a per-layer input
    projection around a shared pool) the wrapped pool's root. Wrappers hold the pool by reference.
    rows(ids): ids (...) int64 slot ids -> (...) int64 rows of ``root()``'s "values" tables they read (what a
    batch touches, for sparse memory finetuning); default: the ids themselves.
    quantize_(fmt), offload_(where, prefix): for serving (``memlayers.serving``), keep the values in 8 bits with
    one scale per row, or off the compute device, in place; stores with ``servable`` True can
    (``stores.servable.ServableStore``), others raise ValueError. ``offloaded`` says where the values went
    (None: in place).
    prefetch(ids): start bringing the rows that the next read of ``ids`` needs to ids' device (offloaded values);
    default nothing.
    set_value_grad_sink(param, sink): read ``param`` (one of its "values" tables) so that the backward hands
    the bag's ``(ids, weights, grad_out)`` to ``sink`` instead of giving ``param`` a gradient (the fused
    optimizer update, ``memlayers.optim.FusedRowOptimizer``); None restores gradients. Stores that read a
    table otherwise than as a weighted bag of its rows cannot, and raise.
    """

    sparse_grad = False
    lr_decay: tuple[float, float] | None = None
    servable = False  # quantize_ and offload_ work
    offloaded: str | None = None

    def root(self) -> "ValueStore":
        return self

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def quantize_(self, fmt: str) -> None:
        raise ValueError(f"{type(self).__name__} cannot store its values in 8 bits")

    def offload_(self, where: str, prefix: str | None = None) -> None:
        raise ValueError(f"{type(self).__name__} cannot keep its values off the device")

    def prefetch(self, ids: torch.Tensor) -> None:
        pass

    def read_params(self, reads: int) -> int:
        return 0

    def read_flops(self, reads: int) -> int:
        return 0

    def signature(self) -> dict:
        return {"num_slots": self.num_slots, "out_dim": self.out_dim, "sparse_grad": self.sparse_grad}

    def set_value_grad_sink(self, param: nn.Parameter, sink) -> None:
        if sink is None:
            return
        raise ValueError(
            f"{type(self).__name__} cannot update its values inside the backward (it does not read them as a "
            "weighted bag of rows): use fused_values=False for this memory kind"
        )


class Readout(MemoryPart):
    """Maps what the store read back to the model: forward(y (T, d_v), x (T, dim), lead, state, mask) -> (T, dim).

    ``lead`` is the input's leading shape (e.g. (B, S)), for readouts that act along the sequence;
    ``state`` a dict kept across incremental decoding calls (None when not decoding; its tensors one row per
    sequence, as ``Addressing``'s); ``mask`` (T,) bool or None, True = real token: a readout acting along the
    sequence treats padding as the sequence's outside. The layer passes ``mask`` only to a forward that takes it.
    """


def linear_flops(*layers: nn.Linear | None) -> int:
    """2 * in * out per (present) Linear: one multiply-add per weight."""
    return sum(2 * m.in_features * m.out_features for m in layers if m is not None)
