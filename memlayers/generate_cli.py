"""``memlayers generate RUN "prompt"``: continue a prompt with a trained checkpoint and print the continuation.

The run's tokenizer is rebuilt from its saved config (facts: the word vocabulary of the generated world;
text: bytes), the prompt is encoded with bos prepended, and ``Transformer.generate`` decodes with a KV
cache (greedy by default; ``--temperature``, ``--top-k``, ``--top-p``, ``--seed`` to sample).
"""

import argparse

import torch

from .data import WordTokenizer, build_tokenizer, split_words


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """[bos] + the prompt's ids; a word outside a facts run's vocabulary is a ValueError naming it."""
    if isinstance(tokenizer, WordTokenizer):  # a closed vocabulary
        unknown = [w for w in split_words(prompt) if w not in tokenizer.ids]
        if unknown:
            raise ValueError(
                f"the prompt word {unknown[0]!r} is not in the vocabulary of this run's facts corpus "
                f"({tokenizer.vocab_size} tokens: its names, attribute values and templates, case-sensitive)"
                + (f"; unknown too: {', '.join(map(repr, unknown[1:4]))}" if len(unknown) > 1 else "")
            )
    return [tokenizer.bos_id] + tokenizer.encode(prompt)


def generate_command(args: argparse.Namespace) -> int:
    """The body of ``memlayers generate`` (args from ``memlayers.cli.build_parser``): prints the continuation."""
    from .train import load_checkpoint  # needs the 'train' extra: imported only when the command runs
    from .train.trainer import resolve_device

    device = resolve_device(args.device, "--device")  # a one-line error for e.g. cuda without CUDA
    cfg, model, _ = load_checkpoint(args.checkpoint, device=device)
    tokenizer = build_tokenizer(cfg.data)
    prompt = torch.tensor([encode_prompt(tokenizer, args.prompt)], device=device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    eos = tokenizer.eos_id if args.stop_at_eos else None
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_id=eos, generator=generator)  # fmt: skip
    new = out[0, prompt.shape[1] :].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    print(tokenizer.decode(new))
    return 0
