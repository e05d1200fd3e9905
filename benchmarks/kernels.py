"""GPU benchmark of the embedding-bag kernels against torch and the copy-bandwidth ceiling.

    PYTHONPATH=. python benchmarks/kernels.py [--quick] [--sweep]

Default size is the paper-scale config: T=16384 tokens, L=128 rows per token (4 heads x k=32), N=2^20 rows,
d=1024, bf16. Every op is checked against the fp32 reference at the benchmark size before it is timed;
``rel err`` is the largest of ||ours - ref|| / ||ref|| over the output and both gradients.
``TB/s`` counts the bytes of value rows read plus output written. ``--sweep`` adds forward tile
configurations, to tune ``triton_forward.forward_config`` on a new card.
"""

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("benchmarks/kernels.py needs a CUDA GPU (Triton kernels); none is visible to torch.")

import triton

from memlayers.ops.embedding_bag.reference import embedding_bag_reference
from memlayers.ops.embedding_bag.triton_autograd import embedding_bag_triton
from memlayers.ops.embedding_bag.triton_backward import bag_backward_triton, value_grad_triton, weight_grad_triton
from memlayers.ops.embedding_bag.triton_forward import bag_forward_triton, forward_config

SWEEP = [(1, 1024, 1), (2, 1024, 2), (4, 1024, 4), (8, 1024, 4), (8, 1024, 8), (4, 512, 2), (8, 256, 2), (16, 256, 4)]


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel_err(ours, ref) -> float:
    worst = 0.0
    for a, b in zip(ours, ref):
        a = (a.to_dense() if a.is_sparse else a).float()
        worst = max(worst, ((a - b.float()).norm() / b.float().norm()).item())
    return worst


def fwd_bwd(fn, values, indices, weights, grad_out):
    """One forward and backward: (out, dV, dw)."""
    v = values.detach().requires_grad_()
    w = weights.detach().requires_grad_()
    out = fn(v, indices, w)
    return (out, *torch.autograd.grad(out, (v, w), grad_out))


def torch_bag(values, indices, weights):
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")


def copy_ceiling() -> tuple[float, float]:
    """(ms, bytes/s) of cloning 2 GiB of bf16, counting bytes read and written."""
    big = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    ms = bench_ms(big.clone)
    return ms, 2 * big.nbytes / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------------
# Product-key top-k (the paper-scale "product-key scoring + top-k"): the torch reference (einsum + three
# topk passes) against einsum + the fused Triton selection kernel, fp32, forward and forward+backward.
# ---------------------------------------------------------------------------------------------------

PK_SWEEP = [  # selection-kernel configurations timed besides the default (each compiles in ~5 s)
    {"ROWS": 1, "num_warps": 1, "TL_TOPK": True},
    {"ROWS": 1, "num_warps": 2, "TL_TOPK": True},
    {"ROWS": 1, "num_warps": 4, "TL_TOPK": True},
    {"ROWS": 1, "num_warps": 8, "TL_TOPK": True},
]


def product_key_topk_section(quick: bool) -> None:
    """Time and check ``product_key_topk_triton`` against the reference at T=16384, H=4, n=1024, k=32, h=256."""
    from memlayers.ops.product_key_topk.reference import product_key_topk as pk_reference
    from memlayers.ops.product_key_topk.triton_select import (
        product_key_select_triton,
        product_key_topk_triton,
        select_config,
    )

    T, H, n, k, h = (2048 if quick else 16384), 4, 1024, 32, 256
    torch.manual_seed(0)
    q1, q2 = torch.randn(2, T, H, h, device="cuda").unbind(0)
    k1, k2 = torch.randn(2, H, n, h, device="cuda").unbind(0)
    grad = torch.randn(T, H, k, device="cuda")
    leaves = [x.requires_grad_() for x in (q1, q2, k1, k2)]
    table = []  # (name, ms, note)

    def fwd(fn):
        with torch.no_grad():
            return fn(q1, q2, k1, k2, k)

    def fwd_bwd(fn):
        scores, indices = fn(*leaves, k)
        return scores, indices, torch.autograd.grad(scores, leaves, grad)

    ref_scores, ref_indices, ref_grads = fwd_bwd(pk_reference)
    our_scores, our_indices, our_grads = fwd_bwd(product_key_topk_triton)
    mismatches = (our_indices != ref_indices).sum().item()
    score_err = (our_scores - ref_scores).abs().max().item()
    grad_err = max((a - b).abs().max().item() for a, b in zip(our_grads, ref_grads))
    print(
        f"  product-key top-k: index mismatches {mismatches} of {ref_indices.numel()}, "
        f"max |score diff| {score_err:.1e}, max |grad diff| {grad_err:.1e}",
        file=sys.stderr,
    )

    def add(name, fn, note=""):
        ms = bench_ms(fn)
        table.append((name, ms, note))
        print(f"  {name}: {ms:.3f} ms", file=sys.stderr)

    def scores_only():
        with torch.no_grad():
            return torch.einsum("thd,hnd->thn", q1, k1), torch.einsum("thd,hnd->thn", q2, k2)

    s1, s2 = scores_only()
    add("einsum scores only (both halves), fwd", scores_only)
    add("reference fwd (einsum + 3 topk)", lambda: fwd(pk_reference))
    add("ours fwd (einsum + fused select + gather)", lambda: fwd(product_key_topk_triton))
    add("reference fwd+bwd", lambda: fwd_bwd(pk_reference))
    add("ours fwd+bwd", lambda: fwd_bwd(product_key_topk_triton))
    default = select_config(n, k, s1.device)
    for cfg in [default] + [c for c in PK_SWEEP if c != default]:
        bad = (product_key_select_triton(s1, s2, k, cfg) != ref_indices).sum().item()
        note = f"mismatches {bad}" + (" (default)" if cfg == default else "")
        add(f"select kernel only {cfg}", functools.partial(product_key_select_triton, s1, s2, k, cfg), note)

    print(f"\nproduct-key top-k: T={T} H={H} n={n} k={k} half dim={h} fp32; index mismatches vs reference {mismatches}")
    print(f"{'op':<78} {'ms':>8}  note")
    for name, ms, note in table:
        print(f"{name:<78} {ms:8.3f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--sweep", action="store_true", help="also time forward tile configurations")
    args = parser.parse_args()
    T, L, N, d = (2048, 128, 1 << 16, 512) if args.quick else (16384, 128, 1 << 20, 1024)
    torch.manual_seed(0)
    rows = []  # (name, ms, bytes moved or None, rel err or None)

    def add(name, ms, nbytes=None, err=None):
        rows.append((name, ms, nbytes, err))
        print(f"  {name}: {ms:.3f} ms", file=sys.stderr)

    copy_ms, ceiling = copy_ceiling()
    add("copy 2 GiB (clone)", copy_ms, ceiling * copy_ms * 1e-3)

    values = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)
    indices = torch.randint(0, N, (T, L), device="cuda")
    weights = torch.rand(T, L, device="cuda")
    grad_out = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    bag_bytes = (T * L + T) * d * values.element_size()
    ref = fwd_bwd(embedding_bag_reference, values.float(), indices, weights, grad_out.float())

    def timed(name, fn, nbytes, ref_part, outputs=list):
        """Check ``outputs(fn())`` against ``ref_part``, then time ``fn``."""
        err = rel_err(outputs(fn()), ref_part)
        add(name, bench_ms(fn), nbytes, err)

    def one(x):
        return [x]

    timed("torch F.embedding_bag fwd", lambda: torch_bag(values, indices, weights), bag_bytes, ref[:1], one)
    configs = [forward_config(d, values.dtype)]
    if args.sweep:
        configs += [{"BLOCK_L": bl, "BLOCK_D": bd, "num_warps": nw} for bl, bd, nw in SWEEP]
    for cfg in configs:
        fn = functools.partial(bag_forward_triton, values, indices, weights, config=cfg)
        timed(f"ours fwd {cfg}", fn, bag_bytes, ref[:1], one)

    dw_bytes = T * L * d * values.element_size()
    timed("ours bwd piece: weight grad", lambda: weight_grad_triton(values, indices, grad_out), dw_bytes, ref[2:], one)
    for algo in ("atomics", "sorted"):
        for sparse in (False, True):
            fn = functools.partial(value_grad_triton, indices, weights, grad_out, N, algo, sparse)
            name = f"ours bwd piece: value grad {algo} {'sparse' if sparse else 'dense'}"
            if sparse:
                timed(
                    name,
                    fn,
                    None,
                    ref[1:2],
                    lambda g: [torch.sparse_coo_tensor(g[0][None], g[1], (N, d), check_invariants=False)],
                )
            else:
                timed(name, fn, None, ref[1:2], one)
    for sparse in (False, True):  # what the sorted backward runs: both gradients in one per-row pass
        fn = functools.partial(bag_backward_triton, values, indices, weights, grad_out, "sorted", sparse)
        name = f"ours bwd: value + weight grad sorted fused {'sparse' if sparse else 'dense'}"

        def as_list(g, sparse=sparse):
            dv = torch.sparse_coo_tensor(g[0][0][None], g[0][1], (N, d), check_invariants=False) if sparse else g[0]
            return [dv, g[1]]

        timed(name, fn, None, ref[1:], as_list)

    def timed_fwd_bwd(name, fn, vals, g):
        step = functools.partial(fwd_bwd, fn, vals, indices, weights, g)
        timed(name, step, None, ref)

    timed_fwd_bwd("torch F.embedding_bag fwd+bwd (fp32, dense)", torch_bag, values.float(), grad_out.float())
    for sparse in (False, True):
        kind = "sparse" if sparse else "dense"
        bag = functools.partial(embedding_bag_reference, sparse_grad=sparse)
        timed_fwd_bwd(f"reference fwd+bwd ({kind})", bag, values, grad_out)
        for algo in ("atomics", "sorted"):
            bag = functools.partial(embedding_bag_triton, sparse_grad=sparse, backward=algo)
            timed_fwd_bwd(f"ours fwd+bwd {algo} ({kind})", bag, values, grad_out)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"T={T} L={L} N={N} d={d} bf16; copy ceiling {ceiling / 1e12:.2f} TB/s; bag bytes {bag_bytes / 1e9:.2f} GB")
    print(f"{'op':<62} {'ms':>8} {'TB/s':>6} {'ceiling':>8} {'rel err':>8}")
    for name, ms, nbytes, err in rows:
        tbs = f"{nbytes / (ms * 1e-3) / 1e12:6.2f}" if nbytes else " " * 6
        frac = f"{nbytes / (ms * 1e-3) / ceiling:8.0%}" if nbytes else " " * 8
        err_s = f"{err:8.1e}" if err is not None else " " * 8
        print(f"{name:<62} {ms:8.3f} {tbs} {frac} {err_s}")

    # ---- product-key top-k (separate table) ----
    product_key_topk_section(args.quick)


if __name__ == "__main__":
    main()
