"""GPU benchmark of the embedding-bag and product-key top-k kernels against torch and the copy ceiling.

    PYTHONPATH=. python benchmarks/kernels.py [--quick] [--sweep] [--select-budget 60]
    PYTHONPATH=. python benchmarks/kernels.py --tiny       # tiny sizes; on CPU (automatic without CUDA)
                                                          # the Triton kernels run under TRITON_INTERPRET=1

Default size is the paper-scale config: T=16384 tokens, L=128 rows per token (4 heads x k=32), N=2^20 rows,
d=1024, bf16. Every op is checked against the fp32 reference at the benchmark size before it is timed;
``rel err`` is the largest of ||ours - ref|| / ||ref|| over the output and both gradients. ``TB/s`` counts
the bytes of value rows read plus output written. Times: median of ``time_ms`` (``targets.py``) after
warm-up. ``--sweep`` adds forward tile configurations (``SWEEP``), to tune ``forward_config`` on a new card.
The selection kernel is timed at every configuration of ``triton_select.SWEEP_CONFIGS`` (compile-checked
offline; the default ``select_config`` where that list does not exist) until ``--select-budget`` seconds
have passed. A row that fails (a kernel that does not compile, a wrong result) is printed as
``failed: <first line>`` and the others go on.
"""

import argparse
import functools
import os
import sys
import time

# forward tiles of --sweep: (BLOCK_L, BLOCK_D, num_warps)
SWEEP = [(1, 1024, 1), (2, 1024, 2), (4, 1024, 4), (8, 1024, 4), (8, 1024, 8), (4, 512, 2), (8, 256, 2), (16, 256, 4)]
SIZES = {  # bag (T, L, N, d), product-key top-k (T, H, n, k, half dim)
    "full": ((16384, 128, 1 << 20, 1024), (16384, 4, 1024, 32, 256)),
    "quick": ((2048, 128, 1 << 16, 512), (2048, 4, 1024, 32, 256)),
    "tiny": ((8, 4, 64, 32), (4, 2, 16, 4, 8)),  # the interpreter runs ~0.05 s per program
}


def use_interpreter() -> None:
    """Run the Triton kernels on CPU: TRITON_INTERPRET=1, which Triton reads once, when first imported."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        sys.exit("kernels.py: on CPU the Triton kernels run interpreted; set TRITON_INTERPRET=1 before Triton is "
                 "imported (e.g. run this script directly)")  # fmt: skip
    os.environ["TRITON_INTERPRET"] = "1"


def rel_err(ours, ref) -> float:
    worst = 0.0
    for a, b in zip(ours, ref):
        a = (a.to_dense() if a.is_sparse else a).float()
        worst = max(worst, ((a - b.float()).norm() / b.float().norm()).item())
    return worst


def fwd_bwd(fn, values, indices, weights, grad_out):
    """One forward and backward: (out, dV, dw)."""
    import torch

    v = values.detach().requires_grad_()
    w = weights.detach().requires_grad_()
    out = fn(v, indices, w)
    return (out, *torch.autograd.grad(out, (v, w), grad_out))


def torch_bag(values, indices, weights):
    import torch.nn.functional as F

    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")


class Table:
    """Rows (name, ms or "failed: ...", bytes moved or None, rel err or None), each measured by ``add``."""

    def __init__(self, timer):
        self.rows, self.timer = [], timer

    def add(self, name, fn, nbytes=None, check=None, note=""):
        """Time ``fn``; ``check()`` (run first) returns its rel err. A failure becomes the row."""
        from targets import first_line

        try:
            err = check() if check is not None else None
            ms = self.timer(fn)
            self.rows.append((name, ms, nbytes, err, note))
            print(f"  {name}: {ms:.3f} ms", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 (one failing row must not cost the others)
            self.rows.append((name, f"failed: {first_line(e)}", None, None, note))
            print(f"  {name}: failed: {first_line(e)}", file=sys.stderr, flush=True)


def bag_section(table: Table, size, sweep: bool, device):
    """The bag's kernels, each row calling its function by name when it runs (a renamed or changed kernel
    fails its rows, not the section)."""
    import torch

    from memlayers.ops.embedding_bag import reference as ref_mod
    from memlayers.ops.embedding_bag import triton_autograd as ag
    from memlayers.ops.embedding_bag import triton_backward as bwd
    from memlayers.ops.embedding_bag import triton_forward as fwd

    T, L, N, d = size
    big = torch.empty((1 << 30) if device.type == "cuda" else (1 << 22), dtype=torch.bfloat16, device=device)
    copy_ms = table.timer(big.clone)
    ceiling = 2 * big.nbytes / (copy_ms * 1e-3)
    table.rows.append((f"copy {big.nbytes >> 20} MiB (clone)", copy_ms, 2 * big.nbytes, None, ""))
    del big

    values = torch.randn(N, d, device=device, dtype=torch.bfloat16)
    indices = torch.randint(0, N, (T, L), device=device)
    weights = torch.rand(T, L, device=device)
    grad_out = torch.randn(T, d, device=device, dtype=torch.bfloat16)
    bag_bytes = (T * L + T) * d * values.element_size()
    ref = fwd_bwd(ref_mod.embedding_bag_reference, values.float(), indices, weights, grad_out.float())

    def check(fn, ref_part, outputs=lambda x: [x]):
        return lambda: rel_err(outputs(fn()), ref_part)

    def sparse_dv(g):
        return torch.sparse_coo_tensor(g[0][None], g[1], (N, d), check_invariants=False)

    fn = functools.partial(torch_bag, values, indices, weights)
    table.add("torch F.embedding_bag fwd", fn, bag_bytes, check(fn, ref[:1]))
    configs = [fwd.forward_config(d, values.dtype)]
    if sweep:
        configs += [{"BLOCK_L": bl, "BLOCK_D": bd, "num_warps": nw} for bl, bd, nw in SWEEP]
    for cfg in configs:

        def forward(cfg=cfg):
            return fwd.bag_forward_triton(values, indices, weights, config=cfg)

        table.add(f"ours fwd {cfg}", forward, bag_bytes, check(forward, ref[:1]))

    def weight_grad():
        return bwd.weight_grad_triton(values, indices, grad_out)

    table.add(
        "ours bwd piece: weight grad", weight_grad, T * L * d * values.element_size(), check(weight_grad, ref[2:])
    )
    for algo in ("atomics", "sorted"):
        for sparse in (False, True):

            def value_grad(algo=algo, sparse=sparse):
                return bwd.value_grad_triton(indices, weights, grad_out, N, algo, sparse)

            name = f"ours bwd piece: value grad {algo} {'sparse' if sparse else 'dense'}"
            outputs = sparse_dv if sparse else lambda g: g
            table.add(name, value_grad, None, check(value_grad, ref[1:2], lambda g, o=outputs: [o(g)]))
    for sparse in (False, True):  # what the sorted backward runs: both gradients in one per-row pass

        def both_grads(sparse=sparse):
            return bwd.bag_backward_triton(values, indices, weights, grad_out, "sorted", sparse)

        name = f"ours bwd: value + weight grad sorted fused {'sparse' if sparse else 'dense'}"
        outputs = sparse_dv if sparse else lambda g: g
        table.add(name, both_grads, None, check(both_grads, ref[1:], lambda g, o=outputs: [o(g[0]), g[1]]))

    def add_fwd_bwd(name, bag, vals, g):
        fn = functools.partial(fwd_bwd, bag, vals, indices, weights, g)
        table.add(name, fn, None, check(fn, ref, list))

    add_fwd_bwd("torch F.embedding_bag fwd+bwd (fp32, dense)", torch_bag, values.float(), grad_out.float())
    for sparse in (False, True):
        kind = "sparse" if sparse else "dense"

        def reference(v, i, w, sparse=sparse):
            return ref_mod.embedding_bag_reference(v, i, w, sparse_grad=sparse)

        add_fwd_bwd(f"reference fwd+bwd ({kind})", reference, values, grad_out)
        for algo in ("atomics", "sorted"):

            def ours(v, i, w, sparse=sparse, algo=algo):
                return ag.embedding_bag_triton(v, i, w, sparse_grad=sparse, backward=algo)

            add_fwd_bwd(f"ours fwd+bwd {algo} ({kind})", ours, values, grad_out)
    return ceiling, bag_bytes


def select_configs(n: int, k: int, device) -> list[dict]:
    """``triton_select.SWEEP_CONFIGS`` (every one compile-checked offline), else the default config alone."""
    from memlayers.ops.product_key_topk import triton_select

    configs = getattr(triton_select, "SWEEP_CONFIGS", None)
    return [dict(c) for c in configs] if configs is not None else [triton_select.select_config(n, k, device)]


def product_key_topk_section(table: Table, size, budget_s: float, device) -> None:
    """Time and check ``product_key_topk_triton`` against the reference (fp32), then the selection kernel
    alone at each sweep configuration."""
    import torch

    from memlayers.ops.product_key_topk.reference import product_key_topk as pk_reference
    from memlayers.ops.product_key_topk.triton_select import (
        product_key_select_triton,
        product_key_topk_triton,
        select_config,
    )

    T, H, n, k, h = size
    torch.manual_seed(0)
    q1, q2 = torch.randn(2, T, H, h, device=device).unbind(0)
    k1, k2 = torch.randn(2, H, n, h, device=device).unbind(0)
    grad = torch.randn(T, H, k, device=device)
    leaves = [x.requires_grad_() for x in (q1, q2, k1, k2)]

    def fwd(fn):
        with torch.no_grad():
            return fn(q1, q2, k1, k2, k)

    def fwd_bwd_pk(fn):
        scores, indices = fn(*leaves, k)
        return scores, indices, torch.autograd.grad(scores, leaves, grad)

    ref_scores, ref_indices, ref_grads = fwd_bwd_pk(pk_reference)

    def check_ours():
        scores, indices, grads = fwd_bwd_pk(product_key_topk_triton)
        bad = (indices != ref_indices).sum().item()
        if bad:
            raise AssertionError(f"{bad} of {ref_indices.numel()} indices differ from the reference")
        return rel_err([scores, *grads], [ref_scores, *ref_grads])

    def scores_only():
        with torch.no_grad():
            return torch.einsum("thd,hnd->thn", q1, k1), torch.einsum("thd,hnd->thn", q2, k2)

    table.add("einsum scores only (both halves), fwd", scores_only)
    table.add("reference fwd (einsum + 3 topk)", lambda: fwd(pk_reference))
    table.add("ours fwd (einsum + fused select + gather)", lambda: fwd(product_key_topk_triton), check=check_ours)
    table.add("reference fwd+bwd", lambda: fwd_bwd_pk(pk_reference))
    table.add("ours fwd+bwd", lambda: fwd_bwd_pk(product_key_topk_triton), check=check_ours)
    s1, s2 = scores_only()
    default = select_config(n, k, s1.device)
    start = time.perf_counter()
    for cfg in select_configs(n, k, s1.device):
        name = f"select kernel only {cfg}"
        note = "default" if cfg == default else ""
        if time.perf_counter() - start > budget_s:
            table.rows.append((name, f"skipped (over --select-budget {budget_s:g} s)", None, None, note))
            continue

        def check(cfg=cfg):
            bad = (product_key_select_triton(s1, s2, k, cfg) != ref_indices).sum().item()
            if bad:
                raise AssertionError(f"{bad} of {ref_indices.numel()} indices differ from the reference")
            return 0.0

        table.add(name, functools.partial(product_key_select_triton, s1, s2, k, cfg), check=check, note=note)


def print_rows(rows, ceiling=None) -> None:
    print(f"{'op':<78} {'ms':>8} {'TB/s':>6} {'ceiling':>8} {'rel err':>8}  note")
    for name, ms, nbytes, err, note in rows:
        if isinstance(ms, str):
            print(f"{name:<78} {ms}{'  ' + note if note else ''}")
            continue
        tbs = f"{nbytes / (ms * 1e-3) / 1e12:6.2f}" if nbytes else " " * 6
        frac = f"{nbytes / (ms * 1e-3) / ceiling:8.0%}" if nbytes and ceiling else " " * 8
        err_s = f"{err:8.1e}" if err is not None else " " * 8
        print(f"{name:<78} {ms:8.3f} {tbs} {frac} {err_s}  {note}".rstrip())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (T=2048, N=2^16, d=512)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a smoke test (the default on CPU)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA if available, else CPU with the kernels interpreted")  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="also time forward tile configurations")
    parser.add_argument("--select-budget", type=float, default=60.0,
                        help="seconds for the selection-kernel sweep (compiling a config takes ~5 s)")  # fmt: skip
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("kernels.py: --device cuda but torch sees no CUDA device; use --device cpu (interpreted kernels)")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        use_interpreter()
    import triton
    from targets import first_line, time_ms

    size = "tiny" if args.tiny or device.type == "cpu" else "quick" if args.quick else "full"
    warmup, iters = (3, 20) if device.type == "cuda" else (0, 1)
    timer = functools.partial(time_ms, device=device, warmup=warmup, iters=iters)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, kernels interpreted"
    print(f"\n{name}, torch {torch.__version__}, triton {triton.__version__}")
    table = Table(timer)
    T, L, N, d = SIZES[size][0]
    try:
        ceiling, bag_bytes = bag_section(table, SIZES[size][0], args.sweep, device)
        print(
            f"T={T} L={L} N={N} d={d} bf16; copy ceiling {ceiling / 1e12:.2f} TB/s; bag bytes {bag_bytes / 1e9:.2f} GB"
        )
    except Exception as e:  # noqa: BLE001 (the top-k section still runs)
        ceiling = None
        print(f"embedding bag section failed: {first_line(e)}")
    print_rows(table.rows, ceiling)

    table = Table(timer)
    T, H, n, k, h = SIZES[size][1]
    print(f"\nproduct-key top-k: T={T} H={H} n={n} k={k} half dim={h} fp32; rel err: scores and gradients")
    try:
        product_key_topk_section(table, SIZES[size][1], args.select_budget, device)
    except Exception as e:  # noqa: BLE001
        print(f"product-key top-k section failed: {first_line(e)}")
    print_rows(table.rows)


if __name__ == "__main__":
    main()
