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
attention mask (so padding stays out of query BatchNorm statistics and usage metrics), the token ids (n-gram
memories) and a decoding state per sequence (n-gram memories under ``generate``; beam search, which reorders
the sequences, is not supported for them), and in training add the memories' auxiliary losses to the loss.
"""

import glob
import os

import torch
from torch import nn

from ..memory.layer import MemoryLayer
from ..model.config import MemorySpec, parse_placement
from ..model.transformer import Pools, read_pool

CONFIG_KEY = "memlayers"  # model.config.memlayers: the list of add_memory_layers calls, to rebuild the model
POOLS = "memlayers_pools"  # the model's attribute holding the shared value pools


class MemoryMLP(nn.Module):
    """What a decoder layer's ``mlp`` becomes: ``memory(h)`` (mode "replace", ``mlp`` None) or ``mlp(h) +
    memory(h)`` ("beside"). h (B, T, dim) -> (B, T, dim).

    The model's hook sets, at every forward of the model, ``mask`` (B, S) bool (True = real token) and
    ``token_ids`` (B, S) (either None), S >= T: the last T positions are these (they stay set until the next
    forward, so that gradient checkpointing recomputes with them); and ``state``: None in training, else the
    decoding state, a fresh dict when the forward starts without a cache or from an empty one, kept while the
    cache grows.
    """

    def __init__(self, memory: MemoryLayer, mlp: nn.Module | None = None):
        super().__init__()
        self.memory = memory
        self.mlp = mlp
        self.mask = self.token_ids = self.state = None

    def forward(self, h: torch.Tensor, *args, **kwargs):
        batch, seq = h.shape[0], h.shape[-2]
        mask, ids = (t[:, -seq:] if t is not None and t.shape[0] == batch and t.shape[1] >= seq else None
                     for t in (self.mask, self.token_ids))  # fmt: skip
        m = self.memory(h, mask=mask, token_ids=ids, state=self.state)
        if self.mlp is None:
            return m
        out = self.mlp(h, *args, **kwargs)
        return (out[0] + m, *out[1:]) if isinstance(out, tuple) else out + m


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, list) of the model's decoder layers: the first ``nn.ModuleList`` whose every layer has an
    ``mlp`` (``model.layers`` in Llama/Qwen, ``transformer.h`` in GPT-2)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(layer, "mlp") for layer in module):
            return name, module
    raise ValueError(
        f"add_memory_layers: found no list of decoder layers with an `mlp` in {type(model).__name__}; "
        "it supports causal LMs built like Llama, Qwen or GPT-2 (model.layers[i].mlp or transformer.h[i].mlp)"
    )


def memory_layers(model: nn.Module) -> list[tuple[int, MemoryLayer]]:
    """[(decoder layer index, its MemoryLayer), ...] of a model ``add_memory_layers`` changed."""
    _, layers = decoder_layers(model)
    return [(i, layer.mlp.memory) for i, layer in enumerate(layers) if isinstance(layer.mlp, MemoryMLP)]


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
    where = dict(device=embedding.weight.device, dtype=embedding.weight.dtype)
    mc = spec.memory_config(embedding.embedding_dim, "add_memory_layers options", len(stack), embedding.num_embeddings)
    if not hasattr(model, POOLS):
        model.add_module(POOLS, Pools({}))
    pools = getattr(model, POOLS)
    current = dict(pools.items())  # read_pool adds the pools it creates
    for i in blocks:
        _, store = read_pool(spec, i, len(stack), mc, current)
        stack[i].mlp = MemoryMLP(MemoryLayer(mc, store).to(**where), stack[i].mlp if spec.mode == "beside" else None)
    for name, store in current.items():
        if name not in pools:
            pools.add_module(name, store.to(**where))  # in place: the layers' references stay valid
    if not getattr(model, "_memlayers_hooks", False):
        _install_hooks(model, model.get_submodule(path.rpartition(".")[0]), stack)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, [*(getattr(config, CONFIG_KEY, None) or []), entry])
    return model


def _install_hooks(model: nn.Module, base: nn.Module, stack: nn.ModuleList) -> None:
    """A hook on ``base`` (the module running the decoder layers) setting the memories' mask, token ids and
    decoding state, and one on ``model`` adding the memories' auxiliary losses to its training loss."""

    def wrappers():
        return [layer.mlp for layer in stack if isinstance(layer.mlp, MemoryMLP)]

    def set_context(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None  # else: no padding
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 calls it "cache"
        fresh = past is None or not hasattr(past, "get_seq_length") or past.get_seq_length() == 0
        for w in wrappers():
            w.mask, w.token_ids = mask, ids if isinstance(ids, torch.Tensor) else None
            if module.training:
                w.state = None
            elif fresh or w.state is None:
                w.state = {}

    def add_aux_loss(module, args, kwargs, output):
        loss = getattr(output, "loss", None)
        if module.training and loss is not None:
            aux = [a for _, layer in memory_layers(module) if (a := layer.aux_loss()) is not None]
            if aux:
                output.loss = loss + sum(aux)
        return output

    base.register_forward_pre_hook(set_context, with_kwargs=True)
    model.register_forward_hook(add_aux_loss, with_kwargs=True)
    model._memlayers_hooks = True


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM ``save_pretrained`` wrote to ``path`` after ``add_memory_layers``: built from its
    ``config.json`` (transformers' ``AutoModelForCausalLM.from_config``), its memory layers added again from
    the config's ``memlayers`` entry, then every weight loaded from the directory's safetensors files (one
    or sharded) and checked: a weight missing (other than one tied to a loaded one) or left over is an error.
    dtype: None = the checkpoint's floating dtype.
    """
    from .._extras import require

    transformers = require("transformers", "hf")
    load_file = require("safetensors.torch", "hf").load_file

    path = os.fspath(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not os.path.isfile(os.path.join(path, "config.json")) or not files:
        raise FileNotFoundError(
            f"{path!r} holds no config.json and *.safetensors; give the directory model.save_pretrained wrote"
        )
    config = transformers.AutoConfig.from_pretrained(path)
    entries = getattr(config, CONFIG_KEY, None)
    if not entries:
        raise ValueError(
            f"{path}/config.json has no {CONFIG_KEY!r} entry: the model has no memory layers; load it with "
            "transformers' AutoModelForCausalLM.from_pretrained"
        )
    setattr(config, CONFIG_KEY, [])  # add_memory_layers records them again
    state = {}
    for file in files:
        state.update(load_file(file))
    model = transformers.AutoModelForCausalLM.from_config(config)
    for entry in entries:
        entry = dict(entry)
        add_memory_layers(model, **entry.pop("options"), **entry)
    missing, unexpected = model.load_state_dict(state, strict=False)
    held = model.state_dict(keep_vars=True)
    names: dict[int, set] = {}
    for key, tensor in held.items():
        names.setdefault(id(tensor), set()).add(key)
    missing = [k for k in missing if not names[id(held[k])] & state.keys()]  # tied to a loaded weight: fine
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not match the model its config describes (missing {missing[:5]}, unexpected "
            f"{list(unexpected)[:5]}); was it saved from a model changed after add_memory_layers?"
        )
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    return model.to(dtype or max(set(floating), key=floating.count)).eval()


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
