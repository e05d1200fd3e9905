"""Memory layers in Hugging Face transformers causal language models.

    from transformers import AutoModelForCausalLM
    from memlayers.integrations.hf import add_memory_layers, from_pretrained

    model = AutoModelForCausalLM.from_pretrained("path/to/a/llama-or-qwen-or-gpt2")
    add_memory_layers(model, layers="1,3", preset="memory_plus", pool="values", n_keys=256)
    ...                                     # train: memlayers.build_optimizer(model), HF Trainer, your loop
    model.save_pretrained("out")            # safetensors, and config.json with a "memlayers" entry
    model = from_pretrained("out")          # the model rebuilt from that config, memories added, weights loaded
    model.generate(...)

``add_memory_layers`` puts a ``memlayers.MemoryLayer`` in the MLP slot of the chosen decoder layers: it
replaces the MLP (``mode="replace"``) or is added to its output (``"beside"``). Any model whose decoder layers
sit in one ``nn.ModuleList`` and have an ``mlp`` taking the normalised hidden states works (Llama, Qwen2/3,
Mistral, GPT-2, ...). Around the model's forward, hooks hand the memory layers what an MLP never sees: the
attention mask (so padding stays out of query BatchNorm statistics and usage metrics, and n-gram memories
treat it as the outside of the sequence), the token ids (n-gram memories) and a decoding state per sequence
(n-gram memories under ``generate``; beam search reorders it with the cache), and in training add the memories'
auxiliary losses to the loss.
"""

import contextlib
import inspect
import os
import types

import torch
from torch import nn

from ..memory.layer import MemoryLayer
from ..memory.parts import MemoryPart
from ..model.config import MemorySpec, parse_placement
from ..model.transformer import Pools, read_pool

CONFIG_KEY = "memlayers"  # model.config.memlayers: the list of add_memory_layers calls, to rebuild the model
POOLS = "memlayers_pools"  # the model's attribute holding the shared value pools


class MemoryMLP(nn.Module):
    """What a decoder layer's ``mlp`` becomes: ``memory(h)`` (mode "replace", ``mlp`` None) or ``mlp(h) +
    memory(h)`` ("beside"). h (B, T, dim) -> (B, T, dim).

    The model's hook sets, at every forward of the model, ``mask`` (B, S) bool (True = real token) and
    ``token_ids`` (B, S) (either None), S >= T: the last T positions are these (they stay set until the next
    forward, so that gradient checkpointing recomputes with them); and ``state``: None without a KV cache, else
    the decoding state, a fresh dict when the cache is empty, kept while it grows (``seen`` tokens).
    """

    def __init__(self, memory: MemoryLayer, mlp: nn.Module | None = None):
        super().__init__()
        self.memory = memory
        self.mlp = mlp
        self.mask = self.token_ids = self.state = self.seen = None

    def forward(self, h: torch.Tensor, *args, **kwargs):
        if not isinstance(self.memory, MemoryLayer):
            raise ValueError(
                f"memory layer: it was wrapped in a {type(self.memory).__name__} (peft's modules_to_save?), which "
                "trains a copy, and a copy reads its own copy of a shared pool; instead unfreeze the memories: "
                "for m in memlayers.integrations.hf.memory_modules(model): m.requires_grad_(True)"
            )
        batch, seq = h.shape[0], h.shape[-2]
        for name, t in (("attention_mask", self.mask), ("input_ids", self.token_ids)):
            if t is not None and (t.shape[0] != batch or t.shape[1] < seq):
                raise ValueError(
                    f"memory layer: the model's {name} is {tuple(t.shape)} but the layer's input is {tuple(h.shape)}; "
                    "call the model itself (its hooks hand the memory these), not its decoder layers"
                )
        mask, ids = (None if t is None else t[:, -seq:] for t in (self.mask, self.token_ids))
        m = self.memory(h, mask=mask, token_ids=ids, state=self.state)
        if self.mlp is None:
            return m
        out = self.mlp(h, *args, **kwargs)
        return (out[0] + m, *out[1:]) if isinstance(out, tuple) else out + m


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path in ``model``, list) of the model's decoder layers: the one ``nn.ModuleList`` of layers that
    all have an ``mlp`` inside its decoder (``model.get_decoder()``: ``model.layers`` in Llama/Qwen,
    ``transformer.h`` in GPT-2; a vision tower's layers are not searched)."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = model
    names = {id(m): n for n, m in model.named_modules()}
    found = [m for m in (decoder or model).modules()
             if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(layer, "mlp") for layer in m)]  # fmt: skip
    if len(found) != 1 or id(found[0]) not in names:
        what = "no" if not found else f"{len(found)}"
        raise ValueError(
            f"add_memory_layers: found {what} list(s) of decoder layers with an `mlp` in {type(model).__name__}; "
            "it supports causal LMs built like Llama, Qwen or GPT-2 (model.layers[i].mlp or transformer.h[i].mlp)"
        )
    return names[id(found[0])], found[0]


def memory_layers(model: nn.Module) -> list[tuple[int, MemoryLayer]]:
    """[(decoder layer index, its MemoryLayer), ...] of a model ``add_memory_layers`` changed."""
    _, layers = decoder_layers(model)
    return [(i, layer.mlp.memory) for i, layer in enumerate(layers) if isinstance(layer.mlp, MemoryMLP)]


def memory_modules(model: nn.Module) -> list[nn.Module]:
    """The memory layers and the module of shared value pools ``add_memory_layers`` added, e.g. to train them
    beside LoRA adapters: ``for m in memory_modules(peft_model): m.requires_grad_(True)`` (``peft`` freezes them)."""
    pools = getattr(model, POOLS, None)
    return [m for _, m in memory_layers(model)] + ([pools] if pools is not None else [])


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the memories' auxiliary losses from the model's last forward, or None when none has one: what
    the model adds to its training loss, to add yourself where the loss is computed outside the model (under
    gradient accumulation the model scales it by the micro-batch's share of the tokens; do the same)."""
    return _sum_aux(m for _, m in memory_layers(model))


def _sum_aux(memories) -> torch.Tensor | None:
    losses = [a for m in memories if (a := m.aux_loss()) is not None]
    return sum(losses) if losses else None


def add_memory_layers(
    model: nn.Module,
    layers: str = "1",
    preset: str = "memory_plus",
    mode: str = "replace",
    *,
    pool: str | None = None,
    share: str = "all",
    **options,
) -> nn.Module:
    """Add memory layers to a transformers causal LM in place; returns ``model``.

    layers: the decoder layers, a placement string ("1,3", "all", "every:2", "center:3:2"; see
        ``memlayers.model.parse_placement``); preset: a memory preset (``memlayers.PRESETS``), scaled to the
        model's width; mode: "replace" (instead of the layer's MLP) or "beside" (added to its output);
        pool, share: layers naming the same pool read one value store (as in ``memlayers.model.MemorySpec``;
        the pools live in ``model.memlayers_pools``); options: the preset's config fields, e.g.
        ``n_keys=256, topk=32``.
    The memories are built on the device and in the dtype of the model's input embeddings, with their own
    initialisation. The call is recorded in ``model.config.memlayers``, so that ``save_pretrained`` and this
    module's ``from_pretrained`` rebuild the model.
    """
    entry = dict(layers=layers, preset=preset, mode=mode, pool=pool, share=share, options=dict(options))
    spec = MemorySpec(**entry)
    path, stack = decoder_layers(model)
    blocks = parse_placement(spec.layers, len(stack))
    taken = [i for i in blocks if isinstance(stack[i].mlp, MemoryMLP)]
    if taken:
        raise ValueError(f"add_memory_layers: decoder layer(s) {taken} already have a memory layer; pick others")
    embedding = model.get_input_embeddings()
    dim, dtype = embedding.embedding_dim, embedding.weight.dtype
    mc = spec.memory_config(dim, "add_memory_layers options", len(stack), embedding.num_embeddings)
    if spec.mode == "replace" and _returns_tuple(stack[blocks[0]].mlp, dim, dtype):
        raise ValueError(
            f"add_memory_layers: the MLPs of {type(model).__name__} return tuples (e.g. router logits) that its "
            "decoder layers unpack; a memory cannot replace them: use mode='beside'"
        )
    if not hasattr(model, POOLS):
        model.add_module(POOLS, Pools({}))
    pools = getattr(model, POOLS)
    current, moved = dict(pools.items()), set()  # read_pool adds the pools it creates
    for i in blocks:
        with _default_dtype(dtype):  # born in the model's dtype: no float32 copy of a big table first
            name, store = read_pool(spec, i, len(stack), mc, current)
            memory = MemoryLayer(mc, store)
        device = next(stack[i].parameters(), embedding.weight).device  # the layer's (device_map may spread them)
        if name is not None and name not in pools and name not in moved:  # a new pool, placed with its first reader
            current[name].to(device=device, dtype=dtype)  # in place: the layers' references stay valid
            moved.add(name)
        memory = memory.to(device=device, dtype=dtype)  # (the parts keep their float32 statistics buffers)
        stack[i].mlp = MemoryMLP(memory, stack[i].mlp if spec.mode == "beside" else None)
    for name, store in current.items():
        if name not in pools:
            pools.add_module(name, store)
    if not getattr(model, "_memlayers_hooks", False):
        base, _, rel = path.rpartition(".")
        _install_hooks(model, model.get_submodule(base), rel, path)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, [*(getattr(config, CONFIG_KEY, None) or []), entry])
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """torch's default dtype set to ``dtype`` for the block (when it is a floating dtype), then restored."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else before)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _returns_tuple(mlp: nn.Module, dim: int, dtype: torch.dtype) -> bool:
    """Whether ``mlp`` returns a tuple (MoE blocks that also return router logits), tried on one token."""
    weight = next(mlp.parameters(), None)
    if weight is None or weight.is_meta:
        return False
    with torch.no_grad():
        return isinstance(mlp(torch.zeros(1, 1, dim, device=weight.device, dtype=dtype)), tuple)


def _install_hooks(model: nn.Module, base: nn.Module, rel: str, path: str) -> None:
    """A hook on ``base`` (the module running the decoder layers, ``rel`` the path of their list in it) setting the
    memories' mask, token ids and decoding state, and one on ``model`` (``path``: the list's in it) adding the memories' auxiliary losses to
    its training loss. The hooks find the layers from the module they are called on, so a deep copy of the
    model works on its own layers."""

    def set_context(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if isinstance(ids, torch.Tensor) else None
        mask = kwargs.get("attention_mask")
        mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None  # else: no padding
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 calls it "cache"
        seen = past.get_seq_length() if hasattr(past, "get_seq_length") else 0
        for layer in module.get_submodule(rel):
            w = layer.mlp
            if not isinstance(w, MemoryMLP):
                continue
            w.mask, w.token_ids = mask, ids
            if past is None:  # no decoding (training, a plain forward): no state
                w.state = w.seen = None
            elif seen == 0:  # a cached sequence starts
                w.state, w.seen = {}, 0
            elif w.seen != seen and w.memory.needs_token_ids:  # n-gram memories keep a history of the tokens
                raise ValueError(
                    f"memory layer: the cache holds {seen} tokens but the memory's decoding state {w.seen}; an n-gram "
                    "memory needs every token through the model in order (no cache reuse or assisted decoding): "
                    "use greedy, sampled or beam-search generate"
                )
            if w.seen is not None and ids is not None:
                w.seen += ids.shape[-1]

    signature = inspect.signature(model.forward)

    def argument(name: str, args, kwargs):
        """The model call's argument ``name``, given by keyword or by position (None if not given)."""
        if name in kwargs or not args:
            return kwargs.get(name)
        try:
            return signature.bind_partial(*args, **kwargs).arguments.get(name)
        except TypeError:
            return None

    def add_aux_loss(module, args, kwargs, output):
        labels = argument("labels", args, kwargs)
        as_tuple = isinstance(output, tuple)  # return_dict=False: (loss, logits, ...) when labels are given
        loss = (output[0] if labels is not None and output else None) if as_tuple else getattr(output, "loss", None)
        if module.training and loss is not None:
            layers = module.get_submodule(path)  # not memory_layers: no module walk per step
            aux = _sum_aux(layer.mlp.memory for layer in layers if isinstance(layer.mlp, MemoryMLP))
            if aux is not None:
                total = argument("num_items_in_batch", args, kwargs)
                if labels is not None and total is not None:  # the loss is a share of an accumulated batch's
                    aux = aux * (labels[..., 1:] != -100).sum() / total
                if as_tuple:
                    return (loss + aux, *output[1:])
                output.loss = loss + aux
        return output

    def reorder_cache(self, cache, beam_idx: torch.Tensor):
        """Beam search's reordering of the sequences (``generate`` calls it when a model defines it): the
        cache's, then every memory's decoding state's (its tensors hold one row per sequence, see ``Addressing``)."""
        own = inspect.getattr_static(type(self), "_reorder_cache", None)  # a method or staticmethod of its class
        if own is not None:  # (RAG, RecurrentGemma)
            cache = own.__get__(self, type(self))(cache, beam_idx)
        else:
            cache.reorder_cache(beam_idx)
        for layer in self.get_submodule(path):
            w = layer.mlp
            if isinstance(w, MemoryMLP) and w.state:
                w.state = {
                    k: t.index_select(0, beam_idx.to(t.device)) if isinstance(t, torch.Tensor) else t
                    for k, t in w.state.items()
                }
        return cache

    base.register_forward_pre_hook(set_context, with_kwargs=True)
    model.register_forward_hook(add_aux_loss, with_kwargs=True)
    model._reorder_cache = types.MethodType(reorder_cache, model)  # a deep copy binds its copy to the copied model
    model._memlayers_hooks = True


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None, **kwargs) -> nn.Module:
    """The causal LM ``save_pretrained`` wrote to ``path`` after ``add_memory_layers``, loaded by transformers'
    own ``from_pretrained`` into its class (``config.architectures``) with the memory layers of the config's
    ``memlayers`` entry added at construction: built on the meta device, every weight mapped from the files
    once, converted as transformers converts that class's checkpoints (MoE experts, renamed heads),
    ``generation_config.json`` read, then the memories' buffers kept out of the checkpoint rebuilt (each module
    holding some answers ``reset_buffers()``). A weight missing (other than one tied to a loaded one), left over
    or of another shape is an error.
    dtype: a torch dtype or its name ("bfloat16"); None = the checkpoint's (transformers' ``dtype="auto"``).
    kwargs: more of transformers' ``from_pretrained`` arguments, config fields too (``use_cache=False``); tested
    on CPU only.
    """
    from .._extras import require

    transformers = require("transformers", "hf")
    safetensors = require("safetensors", "hf")

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path!r} holds no config.json and model.safetensors; give the directory model.save_pretrained wrote"
        )
    config = transformers.AutoConfig.from_pretrained(path)
    if not getattr(config, CONFIG_KEY, None):
        raise ValueError(
            f"{path}/config.json has no {CONFIG_KEY!r} entry: the model has no memory layers; load it with "
            "transformers' AutoModelForCausalLM.from_pretrained"
        )
    dtype = dtype or kwargs.pop("torch_dtype", None) or "auto"  # (torch_dtype: transformers' older name)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
            raise ValueError(f"from_pretrained: dtype {dtype!r} is not a torch floating dtype; use e.g. 'bfloat16'")
        dtype = getattr(torch, dtype)
    base = _saved_class(transformers, config, path)

    class WithMemories(base):  # what transformers loads into: its class, the memories added at construction
        def __init__(self, config, *args, **kw):
            super().__init__(config, *args, **kw)
            entries = getattr(config, CONFIG_KEY)
            setattr(config, CONFIG_KEY, [])  # add_memory_layers records them again
            for entry in entries:
                entry = dict(entry)
                add_memory_layers(self, **entry.pop("options"), **entry)

    for attribute in ("__module__", "__name__", "__qualname__"):  # (transformers applies the conversions it
        setattr(WithMemories, attribute, getattr(base, attribute))  # keys on a class to its own classes only)
    kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below, with the keys, rather than raised
    try:
        model, info = WithMemories.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    except OSError as e:  # no weights file
        raise FileNotFoundError(f"{path}: {e}") from None
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path}: a weights file is unreadable ({e}); save the model again") from None
    model.__class__ = base  # the subclass added nothing but the construction
    bad = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise ValueError(
            f"{path}: the weights do not match the model its config describes ({bad}); was it saved from a model "
            "changed after add_memory_layers, or by another version of transformers?"
        )
    _rebuild_buffers(model)
    return model.eval()


def _saved_class(transformers, config, path: str) -> type:
    """The transformers class the model was saved from (``config.architectures``), else the causal-LM class of
    its config."""
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and isinstance(config, cls.config_class):
        return cls
    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise ValueError(
            f"{path}: transformers has no causal LM class for {type(config).__name__} (architectures {names}); "
            "load it with that model's own code, then add_memory_layers and load_state_dict"
        )
    return cls


def _rebuild_buffers(model: nn.Module) -> None:
    """After transformers' loading, which leaves buffers kept out of ``state_dict`` uninitialised: every module
    of the memories holding some rebuilds them with ``reset_buffers()``; one that cannot is an error."""
    ours = {id(m) for top in memory_modules(model) for m in top.modules()}
    for name, module in model.named_modules():
        if id(module) not in ours or not module._non_persistent_buffers_set:
            continue
        reset = getattr(type(module), "reset_buffers", None)
        if reset is None or reset is MemoryPart.reset_buffers:
            raise ValueError(
                f"from_pretrained: {name} ({type(module).__name__}) keeps buffers out of its state_dict "
                f"{sorted(module._non_persistent_buffers_set)} but has no reset_buffers() to rebuild them after "
                "loading; define it (see memlayers.memory.parts.MemoryPart)"
            )
        module.reset_buffers()


def after_step_callback():
    """A ``transformers.TrainerCallback`` calling every memory layer's ``after_step`` after each optimizer step
    (needed for ``key_restart``): ``Trainer(..., callbacks=[after_step_callback()])``."""
    from .._extras import require

    transformers = require("transformers", "hf")

    class MemoryAfterStep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            for _, layer in memory_layers(model):
                layer.after_step(optimizer)

    return MemoryAfterStep()
