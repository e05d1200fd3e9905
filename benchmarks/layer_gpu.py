"""GPU benchmark of a whole Memory+ layer against a SwiGLU FFN, and of the value update step.

    PYTHONPATH=. python benchmarks/layer_gpu.py [--tokens 16384] [--dim 1024] [--n-keys 1024]

the paper-scale config: 16,384 tokens, 4 heads x k=32, N = 1024^2, d = 1024, bf16 autocast with a
bf16 value table. Rows: the layer forward+backward and its pieces (scoring + top-k, the bag), a
SwiGLU FFN (hidden 2816) forward+backward, and one optimizer step on the value table at growing N:
fused dense AdamW, torch's SparseAdam and memlayers' row-sparse optimizers (SparseRowAdam with its
fused Triton kernel and its unfused reference path, SparseRowAdagrad, SparseRowSGD).
"""

import argparse
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("benchmarks/layer_gpu.py needs a CUDA GPU; none is visible to torch.")

import triton

import memlayers
from memlayers.ops import embedding_bag
from memlayers.optim import SparseRowAdagrad, SparseRowAdam, SparseRowSGD


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


class SwiGLU(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w13 = torch.nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(torch.nn.functional.silu(a) * b)


def fwd_bwd_ms(module, x) -> float:
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module(x)
        y.backward(torch.ones_like(y))

    return bench_ms(step)


VALUE_OPTIMIZERS = {
    "fused AdamW (dense grad)": lambda p: torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0, fused=True),
    "torch SparseAdam": lambda p: torch.optim.SparseAdam([p], lr=1e-3),
    "memlayers SparseRowAdam": lambda p: SparseRowAdam([p], lr=1e-3),  # fused Triton kernel on CUDA
    "memlayers SparseRowAdam (reference, unfused)": lambda p: SparseRowAdam([p], lr=1e-3, impl="reference"),
    "memlayers SparseRowAdagrad": lambda p: SparseRowAdagrad([p], lr=1e-2),
    "memlayers SparseRowSGD": lambda p: SparseRowSGD([p], lr=1e-1),
}


def value_step_ms(N, d, name, T, L) -> float:
    """One optimizer step on an (N, d) bf16 table after a bag backward over T tokens x L rows.

    Each timed step gets the gradient as autograd leaves it (a sparse one not flagged coalesced),
    so the optimizers' handling of that (checking or coalescing) is timed too.
    """
    sparse = name != "fused AdamW (dense grad)"
    table = memlayers.ValueTable(N, d, sparse_grad=sparse, dtype=torch.bfloat16, device="cuda")
    p = table.weight
    opt = VALUE_OPTIMIZERS[name](p)
    indices = torch.randint(0, N, (T, L), device="cuda")
    weights = torch.rand(T, L, device="cuda")
    table(indices, weights).float().sum().backward()
    grad = p.grad

    def step():
        if sparse:
            p.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, check_invariants=False)
        opt.step()

    return bench_ms(step)  # the tables are freed on return (the caller empties the cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--step-n-keys", type=int, nargs="*", default=[1024, 2048, 4096])
    a = p.parse_args()
    torch.manual_seed(0)
    T, d = a.tokens, a.dim
    rows = []
    x = torch.randn(T, d, device="cuda", requires_grad=True)

    layer = memlayers.MemoryLayer.from_preset("memory_plus", d, n_keys=a.n_keys, track_usage=False).cuda()
    layer.store.to(torch.bfloat16)
    rows.append(("Memory+ layer fwd+bwd (with usage tracking off)", fwd_bwd_ms(layer, x)))
    layer_tracked = memlayers.MemoryLayer.from_preset("memory_plus", d, pool=layer.store, n_keys=a.n_keys).cuda()
    rows.append(("Memory+ layer fwd+bwd (usage tracking on)", fwd_bwd_ms(layer_tracked, x)))

    def retrieval_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, w = layer.addressing(x)
        w.sum().backward()

    rows.append(("  piece: query + scoring + exact top-k fwd+bwd (torch)", bench_ms(retrieval_step)))
    with torch.no_grad():
        idx, w = layer.addressing(x)
    w = w.flatten(1).detach().requires_grad_()
    idx = idx.flatten(1)
    for impl in ("reference", "triton"):

        def bag_step(impl=impl):
            embedding_bag(layer.store.weight, idx, w, impl=impl).float().sum().backward()

        rows.append((f"  piece: bag fwd+bwd ({impl})", bench_ms(bag_step)))
    rows.append(("SwiGLU FFN d=%d hidden 2816 fwd+bwd" % d, fwd_bwd_ms(SwiGLU(d, 2816).cuda(), x)))
    L = layer.config.heads * layer.config.topk
    for n in a.step_n_keys:
        for name in VALUE_OPTIMIZERS:
            try:
                ms = value_step_ms(n * n, d, name, T, L)
            except torch.OutOfMemoryError:
                ms = float("nan")
            torch.cuda.empty_cache()
            rows.append((f"value step N={n * n:,} {name}", ms))

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"tokens={T} dim={d} N={a.n_keys**2:,} heads x k = {L}")
    print(f"| {'what':<60} | {'ms':>8} |\n|{'-' * 62}|{'-' * 10}|")
    for name, ms in rows:
        print(f"| {name:<60} | {ms:8.3f} |")


if __name__ == "__main__":
    main()
