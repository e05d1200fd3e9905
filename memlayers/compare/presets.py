"""Comparison presets: the same data and training budget for every arm, models matched in FLOPs/token.

Arms (as in the paper's Table 1, in miniature):
    dense         the baseline decoder (SwiGLU FFN in every block)
    dense_2x      a wider dense decoder with ~2x the forward FLOPs/token
    dense_4x      ~4x the FLOPs/token
    moe           every FFN a mixture of experts: top-2 of E experts of half the FFN width (so
                  the dense FLOPs/token), E chosen so the total parameters match the Memory+ arm
    memory        one memory layer (preset "memory") in place of the middle block's FFN
    memory_plus   Memory+ (gated output, one value pool shared by the memory layers) in place of
                  the FFN of several blocks, centred with a stride

The ``cpu_family`` preset compares the memory kinds instead (``family_arms``): dense, memory_plus, peer,
ultramem, ultramem_v2 and engram, matched in FLOPs/token and in memory parameters.

``memlayers compare --list`` prints the presets; ``tests/test_compare.py`` checks the FLOPs matching.
"""

from dataclasses import dataclass, field

from ..data import DataConfig
from ..data.facts import FactsConfig
from ..model import MemorySpec, ModelConfig, MoESpec
from ..train import TrainConfig


@dataclass
class CompareConfig:
    """A named comparison: shared data and training settings, and one model per arm."""

    name: str
    description: str
    data: DataConfig
    train: TrainConfig
    arms: dict[str, ModelConfig] = field(default_factory=dict)


def standard_arms(
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    max_seq_len: int,
    dim_2x: int,
    dim_4x: int,
    moe_experts: int,
    memory: dict,
    memory_layer: str,
    memory_plus_layers: str,
) -> dict[str, ModelConfig]:
    """The six arms of a comparison at one scale (see the module docstring).

    dim_2x, dim_4x: widths of the dense arms with ~2x and ~4x the FLOPs/token of ``dim``.
    memory: ``MemoryConfig`` overrides shared by the memory arms (n_keys, heads, topk, query_norm, ...).
    memory_layer: the block whose FFN the single "memory" layer replaces; memory_plus_layers: a
    placement (e.g. "center:3:2") for the Memory+ layers, which share one value pool.
    """

    def model(width: int = dim, **kw) -> ModelConfig:
        return ModelConfig(dim=width, n_layers=n_layers, n_heads=n_heads, max_seq_len=max_seq_len, **kw)

    expert_hidden = model().hidden // 2  # top-2 of experts half as wide: the dense FFN's FLOPs
    return {
        "dense": model(),
        "dense_2x": model(dim_2x),
        "dense_4x": model(dim_4x),
        "moe": model(moe=MoESpec(layers="all", experts=moe_experts, topk=2, hidden=expert_hidden)),
        "memory": model(memories=[MemorySpec(layers=memory_layer, preset="memory", options=dict(memory))]),
        "memory_plus": model(
            memories=[MemorySpec(layers=memory_plus_layers, preset="memory_plus", pool="values", options=dict(memory))]
        ),
    }


def family_arms(*, dim: int, n_layers: int, n_heads: int, max_seq_len: int) -> dict[str, ModelConfig]:
    """One arm per memory kind at one scale (CPU-sized options), each within 10% of the dense arm's
    FLOPs/token and with ~2.1M memory parameters:

    memory_plus   blocks 1 and 3's FFNs -> Memory+ reading one shared pool (128^2 slots, 4 heads x 16, BN)
    peer          blocks 1 and 3's FFNs -> PEER, one shared pool of 90^2 single-neuron experts, 4 heads x 16
                  (the paper's 8 x 16 reads twice the rows: too slow for this preset's CPU budget)
    ultramem      blocks 1 and 3's FFNs -> UltraMem v1 (256^2 virtual slots, 4x implicit expansion, 2 heads
                  x 16), each reading the block before it (skip-layer)
    ultramem_v2   every block: UltraMemV2 beside a narrower FFN (hidden 256), tables shared in a ring (each
                  row read by 2 blocks)
    engram        block 1: hashed 2/3-gram memory beside the FFN (4 hash heads per order, 16,384+ rows each)
    """

    def model(**kw) -> ModelConfig:
        return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, max_seq_len=max_seq_len, **kw)

    bn = dict(query_norm="batchnorm")
    return {
        "dense": model(),
        "memory_plus": model(memories=[MemorySpec(layers="1,3", preset="memory_plus", pool="values",
                                                  options=dict(n_keys=128, heads=4, topk=16, **bn))]),
        "peer": model(memories=[MemorySpec(layers="1,3", preset="peer", pool="values",
                                           options=dict(n_keys=90, heads=4, topk=16, key_dim=96, **bn))]),
        "ultramem": model(memories=[MemorySpec(layers="1,3", preset="ultramem", skip=1,
                                               options=dict(n_keys=256, heads=2, topk=16))]),
        "ultramem_v2": model(ffn_hidden=256, memories=[MemorySpec(
            layers="all", preset="ultramem_v2", pool="values", share="ring:0.5", mode="beside",
            options=dict(n_keys=112, topk=16, key_dim=32))]),
        "engram": model(memories=[MemorySpec(layers="1", preset="engram", mode="beside",
                                             options=dict(hash_heads=4, d_ngram=64, table_size=16384))]),
    }  # fmt: skip


def _cpu() -> CompareConfig:
    return CompareConfig(
        name="cpu",
        description="300 people's records (1,800 facts), 4-layer d=128 models, 300 steps of 32x64 tokens; "
        "about 8-17 min on 2 CPU cores",
        data=DataConfig(kind="facts", facts=FactsConfig(people=300, formats="records")),
        train=TrainConfig(steps=300, batch_size=32, seq_len=64, lr=3e-3, warmup=30, eval_every=0, ckpt_every=100),
        arms=standard_arms(
            dim=128, n_layers=4, n_heads=4, max_seq_len=64, dim_2x=192, dim_4x=272, moe_experts=10,
            memory=dict(n_keys=128, heads=4, topk=16, query_norm="batchnorm"),
            memory_layer="2", memory_plus_layers="1,3",
        ),  # fmt: skip
    )


def _gpu() -> CompareConfig:
    return CompareConfig(
        name="gpu",
        description="20,000 people as records, biographies and QA (20% of the people's QA held out), 8-layer "
        "d=512 models, 3,000 steps of 64x256 tokens; sized for one H100 (not yet measured)",
        data=DataConfig(kind="facts", facts=FactsConfig(people=20_000, formats="records,bios,qa")),
        train=TrainConfig(steps=3000, batch_size=64, seq_len=256, lr=1e-3, warmup=200, eval_every=1000,
                          ckpt_every=500),  # fmt: skip
        arms=standard_arms(
            dim=512, n_layers=8, n_heads=8, max_seq_len=256, dim_2x=736, dim_4x=1040, moe_experts=18,
            memory=dict(n_keys=512, heads=4, topk=32, query_norm="batchnorm"),
            memory_layer="4", memory_plus_layers="center:3:2",
        ),  # fmt: skip
    )


def _gpu_large() -> CompareConfig:
    return CompareConfig(
        name="gpu_large",
        description="100,000 people as records, biographies and QA, 12-layer d=768 models with 1M-slot memories, "
        "20,000 steps of 64x512 tokens; hours on one H100 (an estimate: not yet measured)",
        data=DataConfig(kind="facts", facts=FactsConfig(people=100_000, formats="records,bios,qa")),
        train=TrainConfig(steps=20_000, batch_size=64, seq_len=512, lr=1e-3, warmup=1000, eval_every=2000,
                          ckpt_every=1000, value_optimizer="adamw"),  # fmt: skip
        arms=standard_arms(
            dim=768, n_layers=12, n_heads=12, max_seq_len=512, dim_2x=1104, dim_4x=1560, moe_experts=30,
            memory=dict(n_keys=1024, heads=4, topk=32, query_norm="batchnorm"),
            memory_layer="6", memory_plus_layers="center:3:4",
        ),  # fmt: skip
    )


def _cpu_family() -> CompareConfig:
    return CompareConfig(
        name="cpu_family",
        description="the memory kinds: dense, Memory+, PEER, UltraMem, UltraMemV2 and engram arms, 100 people's "
        "records (600 facts), 4-layer d=128 models, 200 steps of 24x64 tokens; under 10 min on 2 CPU cores",
        data=DataConfig(kind="facts", facts=FactsConfig(people=100, formats="records")),
        train=TrainConfig(steps=200, batch_size=24, seq_len=64, lr=3e-3, warmup=20, eval_every=0, ckpt_every=100),
        arms=family_arms(dim=128, n_layers=4, n_heads=4, max_seq_len=64),
    )


def _gpu_capacity() -> CompareConfig:
    return CompareConfig(
        name="gpu_capacity",
        description="capacity: 50,000 people's records (300,000 facts, 3.0M bits: more than 2 bits per parameter of "
        "the 1.34M-parameter dense arm), 4-layer d=128 models, 33,000 steps of 512x64 tokens (~500 passes, until "
        "the dense arms plateau); hours on one H100 (an estimate: not yet measured)",
        data=DataConfig(kind="facts", facts=FactsConfig(people=50_000, formats="records", choices=1000)),
        train=TrainConfig(steps=33_000, batch_size=512, seq_len=64, lr=2e-3, warmup=1000, eval_every=3000,
                          ckpt_every=3000),  # fmt: skip
        arms=standard_arms(
            dim=128, n_layers=4, n_heads=4, max_seq_len=64, dim_2x=192, dim_4x=288, moe_experts=32,
            memory=dict(n_keys=256, heads=4, topk=16, query_norm="batchnorm"),
            memory_layer="2", memory_plus_layers="1,3",
        ),  # fmt: skip
    )


PRESETS = {"cpu": _cpu, "cpu_family": _cpu_family, "gpu": _gpu, "gpu_large": _gpu_large,
           "gpu_capacity": _gpu_capacity}


def get_preset(name: str) -> CompareConfig:
    """The named preset (a fresh object each call)."""
    if name not in PRESETS:
        raise ValueError(f"unknown compare preset {name!r}; choose one of {sorted(PRESETS)} (memlayers compare --list)")
    return PRESETS[name]()
