"""memlayers.integrations.hf: memory layers in small randomly initialised transformers models (Llama, Qwen2,
Qwen3, GPT-2; no downloads): training, padding masks, generation with and without the cache, the auxiliary losses,
save_pretrained / from_pretrained round trips, transformers' Trainer, and bad input."""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memlayers import build_optimizer  # noqa: E402
from memlayers.integrations.hf import (  # noqa: E402
    MemoryMLP,
    add_memory_layers,
    after_step_callback,
    aux_loss,
    from_pretrained,
    memory_layers,
    memory_modules,
)

V = 97


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, **common)
        )
    attn = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, **common)  # fmt: skip
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **attn))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**attn))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **attn))


SMALL = dict(n_keys=8, heads=2, topk=4)


def with_memories(family: str) -> torch.nn.Module:
    model = tiny(family)
    add_memory_layers(model, layers="1,3", preset="memory_plus", pool="values", query_norm="batchnorm", **SMALL)
    return add_memory_layers(model, layers="2", preset="pkm", mode="beside", **SMALL)


def batch():
    x = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return x, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2"])
def test_memories_train_generate_and_round_trip(family, tmp_path):
    model = with_memories(family)
    layers = memory_layers(model)
    assert [i for i, _ in layers] == [1, 2, 3] and list(model.memlayers_pools.names()) == ["values"]
    assert layers[0][1].store is layers[2][1].store is model.memlayers_pools["values"]  # one shared pool
    _, stack = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList))
    assert stack[1].mlp.mlp is None and stack[2].mlp.mlp is not None  # replace, beside
    x, mask = batch()
    opt = build_optimizer(model, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=x, attention_mask=mask, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert model.memlayers_pools["values"].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval()
    out = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 16)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert [i for i, _ in memory_layers(loaded)] == [1, 2, 3] and len(loaded.config.memlayers) == 2
    assert list(model.state_dict()) == list(loaded.state_dict())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False), out)


def test_the_memory_sees_the_padding_mask_and_decoding_steps(monkeypatch):
    model = with_memories("llama").eval()
    seen = []
    layer = memory_layers(model)[0][1]
    forward = type(layer).forward

    def spy(self, x, mask=None, token_ids=None, state=None):
        if self is layer:
            seen.append((x.shape[1], None if mask is None else mask.clone(), token_ids))
        return forward(self, x, mask, token_ids, state)

    monkeypatch.setattr(type(layer), "forward", spy)
    x, mask = batch()
    model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert [s[0] for s in seen] == [10, 1, 1]  # the prompt, then one token at a time
    assert torch.equal(seen[0][1], mask.bool()) and torch.equal(seen[0][2], x)
    assert all(s[1].tolist() == [[True], [True]] for s in seen[1:])


def with_engram(family: str = "qwen3") -> torch.nn.Module:
    model = tiny(family)
    add_memory_layers(model, layers="1", preset="engram", mode="beside", hash_heads=2, d_ngram=16, table_size=64)
    with torch.no_grad():
        for p in memory_layers(model)[0][1].parameters():  # an untrained engram's output is tiny: make it count
            p.normal_(0, 0.5)
    return model.eval()


def test_ngram_memory_decodes_with_the_cache_as_without():
    model = with_engram()
    x, mask = batch()
    cached = model.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False)
    full = model.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_an_ngram_memory_reads_a_left_padded_sequence_as_unpadded(family):
    model = with_engram(family)
    x, mask = batch()  # row 1: 3 pad positions, then 7 tokens
    x[1, :3] = 0  # the pad id: the n-grams of the first real tokens must not see it
    alone = x[1:, 3:]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers them
    with torch.no_grad():
        padded = model(input_ids=x, attention_mask=mask, position_ids=positions).logits[1, 3:]
        plain = model(input_ids=alone).logits[0]
    assert torch.allclose(padded, plain, rtol=1e-4, atol=1e-4)
    out = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, 3:], model.generate(alone, max_new_tokens=6, do_sample=False, pad_token_id=0)[0])


def test_beam_search_reorders_the_ngram_memory_state_with_the_cache():
    model = with_engram()
    x, mask = batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False)
    cached = model.generate(x, **kw)
    assert torch.equal(cached, model.generate(x, use_cache=False, **kw))  # no state: every step sees the whole text


def test_an_ngram_memory_refuses_a_cache_it_did_not_see_grow():
    model = tiny("qwen3")
    add_memory_layers(model, layers="1", preset="engram", mode="beside", hash_heads=2, d_ngram=16, table_size=64)
    model.eval()
    x, _ = batch()
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=x[:, :6], cache=cache, use_cache=True)
        model(input_ids=x[:, 6:7], cache=cache, use_cache=True)  # in order: fine
        cache.crop(-3)  # back to 4 tokens, as assisted decoding does: the memory's history no longer matches
        with pytest.raises(ValueError, match="the cache holds 4 tokens but the memory's decoding state 7"):
            model(input_ids=x[:, 4:5], cache=cache, use_cache=True)


def test_a_deep_copy_runs_its_own_memories():
    model = with_memories("llama").eval()
    twin = copy.deepcopy(model)
    x, mask = batch()
    twin(input_ids=x, attention_mask=mask)
    assert torch.equal(memory_layers_mlp(twin, 1).mask, mask.bool()) and memory_layers_mlp(model, 1).mask is None
    assert torch.equal(twin(input_ids=x).logits, model(input_ids=x).logits)


def memory_layers_mlp(model, i):
    return dict(model.named_modules())[f"model.layers.{i}.mlp"]


def test_mlps_returning_tuples_cannot_be_replaced():
    class TupleMLP(torch.nn.Module):  # like MoE blocks returning router logits too
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return self.inner(h), None

    model = tiny("llama")
    for layer in model.model.layers:
        layer.mlp = TupleMLP(layer.mlp)
    with pytest.raises(ValueError, match="return tuples .* use mode='beside'"):
        add_memory_layers(model, layers="1", preset="pkm", **SMALL)
    add_memory_layers(model, layers="1", preset="pkm", mode="beside", **SMALL)
    out, extra = model.model.layers[1].mlp(torch.randn(2, 3, 32))
    assert out.shape == (2, 3, 32) and extra is None


def test_auxiliary_losses_join_the_training_loss():
    model = tiny("llama")
    add_memory_layers(model, layers="1", preset="memory", balance_loss=0.5, **SMALL)
    x, _ = batch()

    def next_token_ce(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)).item()

    model.train()
    out = model(input_ids=x, labels=x)
    aux = memory_layers(model)[0][1].aux_loss().item()
    assert aux_loss(model).item() == aux and aux_loss(tiny("llama")) is None
    n = int((x[:, 1:] != -100).sum())  # Trainer with gradient accumulation: this batch is half of the tokens
    half = model(input_ids=x, labels=x, num_items_in_batch=torch.tensor(2 * n))
    assert half.loss.item() == pytest.approx((next_token_ce(half.logits) + aux) / 2, rel=1e-5)
    assert aux > 0 and out.loss.item() == pytest.approx(next_token_ce(out.logits) + aux, rel=1e-5)
    as_tuple = model(input_ids=x, labels=x, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].item() == pytest.approx(out.loss.item(), rel=1e-6)
    by_position = model(x, None, None, None, None, x, num_items_in_batch=torch.tensor(2 * n))  # labels 6th
    assert by_position.loss.item() == pytest.approx(half.loss.item(), rel=1e-6)
    model.eval()  # no auxiliary loss in evaluation
    out = model(input_ids=x, labels=x)
    assert out.loss.item() == pytest.approx(next_token_ce(out.logits), rel=1e-5)


def test_transformers_trainer_trains_the_memories(tmp_path):
    model = tiny("gpt2")
    add_memory_layers(model, layers="1", preset="memory", key_restart=0.1, restart_every=2, **SMALL)
    x, _ = batch()
    data = [{"input_ids": row, "labels": row} for row in x.repeat(4, 1)]
    before = memory_layers(model)[0][1].store.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], save_strategy="no",
        use_cpu=True, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    opt = build_optimizer(model, lr=1e-2)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, None), callbacks=[after_step_callback()]
    )
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(memory_layers(model)[0][1].store.weight, before)
    restart = memory_layers(model)[0][1].addressing.restarts
    assert restart is not None and int(restart.steps) == 4  # after_step ran after every optimizer step


def test_lora_adapters_train_beside_the_memories_then_merge_and_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    model = with_memories("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not any(p.requires_grad for m in memory_modules(lora) for p in m.parameters())  # peft froze them
    for m in memory_modules(lora):
        m.requires_grad_(True)
    pool = model.memlayers_pools["values"]
    assert memory_modules(lora)[-1] is model.memlayers_pools and memory_layers(lora)[0][1].store is pool
    before, x = pool.weight.detach().clone(), batch()[0]
    opt = build_optimizer(lora, lr=1e-2)
    for _ in range(3):
        loss = lora(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert not torch.equal(pool.weight, before)
    merged = lora.merge_and_unload().eval()  # the adapters folded in: a plain transformers model with memories
    merged.save_pretrained(tmp_path)
    assert torch.allclose(from_pretrained(tmp_path)(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-6)
    copies = peft.get_peft_model(
        with_memories("llama"), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["memory"])
    )
    with pytest.raises(ValueError, match="modules_to_save.*unfreeze the memories"):
        copies(input_ids=x)


def test_memories_are_built_in_the_model_dtype(monkeypatch):
    from memlayers.memory.stores.value_table import ValueTable

    born, init = [], ValueTable.__init__

    def spy(self, *args, **kwargs):
        born.append(torch.get_default_dtype())
        init(self, *args, **kwargs)

    monkeypatch.setattr(ValueTable, "__init__", spy)
    model = tiny("llama").to(torch.bfloat16)
    add_memory_layers(model, layers="1,3", preset="memory_plus", pool="values", query_norm="whiten", **SMALL)
    assert born == [torch.bfloat16] and torch.get_default_dtype() == torch.float32  # no float32 table, restored
    layer = memory_layers(model)[0][1]
    cast = type(layer)(layer.config, layer.store).to(torch.bfloat16)  # built in float32, then cast
    assert {k: t.dtype for k, t in layer.state_dict().items()} == {k: t.dtype for k, t in cast.state_dict().items()}
    assert {k: t.dtype for k, t in layer.named_buffers()} == {k: t.dtype for k, t in cast.named_buffers()}


def test_a_bfloat16_model_reloads_exactly(tmp_path):
    model = tiny("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # as a user loads a bf16 model
    add_memory_layers(model, layers="1", preset="memory_plus", **SMALL)
    model.eval().save_pretrained(tmp_path / "with_memory")
    again = from_pretrained(tmp_path / "with_memory")
    x = batch()[0]
    assert next(again.parameters()).dtype == torch.bfloat16
    assert torch.equal(
        again(input_ids=x).logits, model(input_ids=x).logits
    )  # rotary buffers kept as transformers keeps them
    assert next(from_pretrained(tmp_path / "with_memory", dtype="float32").parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="'int8' is not a torch floating dtype"):
        from_pretrained(tmp_path / "with_memory", dtype="int8")


def test_a_mixture_of_experts_model_round_trips(tmp_path):
    """Mixtral: transformers converts its experts when loading (and back when saving); a memory beside them."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    model = transformers.MixtralForCausalLM(config)
    add_memory_layers(model, layers="1", preset="pkm", mode="beside", **SMALL)
    model.eval().save_pretrained(tmp_path)
    again = from_pretrained(tmp_path)
    assert type(again) is transformers.MixtralForCausalLM and [i for i, _ in memory_layers(again)] == [1]
    x = batch()[0]
    assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)


def test_a_head_transformers_renames_when_loading_round_trips(tmp_path):
    """GPT-NeoX: its output head is `embed_out` on disk, `lm_head` in the model (a conversion keyed on the class)."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    model = transformers.GPTNeoXForCausalLM(config)
    add_memory_layers(model, layers="1", preset="pkm", **SMALL)
    model.eval().save_pretrained(tmp_path)
    again = from_pretrained(tmp_path, use_cache=False)  # a config field passed on, as transformers takes it
    assert type(again) is transformers.GPTNeoXForCausalLM and again.config.use_cache is False
    x = batch()[0]
    assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)
    assert next(from_pretrained(tmp_path, torch_dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_buffers_kept_out_of_the_checkpoint_are_rebuilt(tmp_path):
    model = tiny("llama")
    add_memory_layers(model, layers="1", preset="engram", mode="beside", hash_heads=2, d_ngram=16, table_size=64)
    add_memory_layers(model, layers="2", preset="memory_plus", **SMALL)
    x, mask = batch()
    model.train()(input_ids=x, attention_mask=mask, labels=x).loss.backward()  # usage statistics recorded
    model.eval().save_pretrained(tmp_path)
    again = from_pretrained(tmp_path)
    fresh = dict(model.named_buffers())
    for _, layer in memory_layers(model):
        layer.usage.reset()  # statistics are not saved: a loaded model starts afresh
    for name, buffer in again.named_buffers():
        assert torch.equal(buffer, fresh[name]), name
    tensors = [t for m in again.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
    assert not any(t.is_meta for t in [*again.parameters(), *again.buffers(), *tensors])
    assert torch.equal(again(input_ids=x, attention_mask=mask).logits, model(input_ids=x, attention_mask=mask).logits)


KINDS = {
    "peer": dict(preset="peer", pool="experts", layers="1,3", n_keys=8, heads=2, topk=4),
    "ultramem": dict(preset="ultramem", layers="1", n_keys=8, heads=2, topk=4),
    "ultramem_v2": dict(
        preset="ultramem_v2", pool="v2", share="ring:0.5", layers="all", mode="beside", n_keys=8, topk=4
    ),
    "memory_whiten_restart": dict(preset="memory", layers="2", query_norm="whiten", key_restart=0.1, **SMALL),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips(kind, tmp_path):
    model = tiny("qwen3")
    add_memory_layers(model, **KINDS[kind])
    x, mask = batch()
    opt = build_optimizer(model, lr=1e-2)
    model.train()(input_ids=x, attention_mask=mask, labels=x).loss.backward()
    opt.step()
    for _, layer in memory_layers(model):
        layer.after_step(opt)
    model.eval().save_pretrained(tmp_path)
    again = from_pretrained(tmp_path)
    assert list(again.state_dict()) == list(model.state_dict())
    tensors = [t for m in again.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
    assert not any(t.is_meta for t in [*again.parameters(), *again.buffers(), *tensors])
    assert torch.equal(again(input_ids=x, attention_mask=mask).logits, model(input_ids=x, attention_mask=mask).logits)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="found no list"):
        add_memory_layers(torch.nn.Linear(3, 3))
    model = with_memories("llama")
    with pytest.raises(ValueError, match=r"decoder layer\(s\) \[1\] already have a memory layer"):
        add_memory_layers(model, layers="1", preset="pkm", **SMALL)
    with pytest.raises(ValueError, match="unknown"):
        add_memory_layers(model, layers="0", preset="pkm", no_such_option=1)
    with pytest.raises(ValueError, match="out of range"):
        add_memory_layers(model, layers="9", preset="pkm")
    plain = tiny("llama")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no 'memlayers' entry"):
        from_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        from_pretrained(tmp_path / "nothing")

    class Saved(transformers.LlamaForCausalLM):  # a class of the user's: loaded as the causal LM of its config
        pass

    mine = Saved(tiny("llama").config)
    add_memory_layers(mine, layers="1", preset="pkm", **SMALL)
    mine.save_pretrained(tmp_path / "mine")
    assert type(from_pretrained(tmp_path / "mine")) is transformers.LlamaForCausalLM
    for broken in (b"", b"not safetensors at all"):
        (tmp_path / "mine" / "model.safetensors").write_bytes(broken)
        with pytest.raises(ValueError, match="a weights file is unreadable"):
            from_pretrained(tmp_path / "mine")
    entry = json.loads((tmp_path / "plain" / "config.json").read_text())
    entry["memlayers"] = [dict(layers="1", preset="pkm", mode="beside", pool=None, share="all", options=SMALL)]
    (tmp_path / "plain" / "config.json").write_text(json.dumps(entry))  # memories the weights do not hold
    with pytest.raises(ValueError, match="the weights do not match .*missing_keys"):
        from_pretrained(tmp_path / "plain")
    assert isinstance(dict(model.named_modules())["model.layers.1.mlp"], MemoryMLP)


def test_gradient_checkpointing_recomputes_with_the_same_mask():
    x, mask = batch()
    grads = []
    for checkpointing in (False, True):
        model = with_memories("llama").train()
        if checkpointing:  # transformers 5.24 renamed gradient_checkpointing_enable
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model(input_ids=x, attention_mask=mask, labels=x).loss.backward()
        grads.append(model.memlayers_pools["values"].weight.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_a_part_keeping_buffers_it_cannot_rebuild_is_refused_at_loading(tmp_path, monkeypatch):
    from memlayers.memory.readouts.projected import ProjectedReadout

    init = ProjectedReadout.__init__

    def with_a_derived_buffer(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_buffer("scale", torch.ones(3), persistent=False)  # kept out of the checkpoint

    monkeypatch.setattr(ProjectedReadout, "__init__", with_a_derived_buffer)
    model = tiny("llama")
    add_memory_layers(model, layers="1", preset="pkm", **SMALL)
    model.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"layers.1.mlp.memory.readout \(ProjectedReadout\) .* \['scale'\] but has no reset_buffers\(\)",
    ):
        from_pretrained(tmp_path)
