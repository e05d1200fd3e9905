"""Compile every memlayers Triton kernel for a GPU, without a GPU, and print what ptxas reports.

    python benchmarks/compile_check.py [--arch 90] [--tokens 64] [--dim 1024]

Each kernel is compiled ahead of time exactly as its wrapper launches it at the paper-scale
config (L = 4 heads x k = 32 rows per token, d = 1024, bf16 table, n = 1024 sub-keys, half dim
256; fewer tokens, which changes grids, not kernels): the wrappers run on CPU tensors with
Triton's launcher replaced by a recorder, then each recorded launch is compiled with Triton's own
argument specialisation (dtypes, 16-divisibility, ints equal to 1) for the target ``sm_<arch>``
(90: H100 and H200), and ``ptxas -v`` gives registers per thread, spilled bytes and the shared
memory per program, once per kernel, config and pointer dtypes. ``gather_dot_triton`` (also the
bag's weight gradient) is compiled as well at every tile its ``tile_config`` can pick, and with float64
and mixed table/x dtypes. This catches what the CPU interpreter cannot (kernels that do not compile,
register spills, shared memory over the limit) on machines without a GPU; it does not time anything.
Run it in a process without ``TRITON_INTERPRET=1`` (the kernels must be real ``triton.jit`` functions).
"""

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks/compile_check.py: unset TRITON_INTERPRET (it compiles the kernels, it does not run them)")

import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.runtime.jit import JITFunction

from memlayers.ops.embedding_bag.triton_backward import (
    CHUNK,
    bag_backward_triton,
    value_grad_triton,
    weight_grad_triton,
)
from memlayers.ops.embedding_bag.triton_forward import bag_forward_triton
from memlayers.ops.gather_dot.triton_kernel import MAX_BLOCK_D, MAX_BLOCK_L, gather_dot_triton
from memlayers.ops.product_key_topk.triton_select import product_key_select_triton, select_config
from memlayers.ops.row_update.triton_kernel import row_adagrad_triton, row_adam_triton, row_sgd_triton


def record_launches(cases: dict) -> list[tuple[str, JITFunction, tuple, dict]]:
    """Run each case with kernel launches recorded instead of run: [(case, kernel, args, kwargs)]."""
    launches, current = [], [None]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((current[0], self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        for name, case in cases.items():
            current[0] = name
            case()
    finally:
        JITFunction.run = original
    return launches


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict, target: GPUTarget):
    """Compile one recorded launch for ``target`` as the JIT would: (compiled kernel, its constexprs,
    the element types of its pointer arguments, e.g. "bf16 i64 fp32")."""
    names = [p.name for p in kernel.params]
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = bound.arguments[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(
            BaseBackend, value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        signature[p.name] = kind
        if kind == "constexpr":  # ints equal to 1 and None are specialised into the code
            constexprs[p.name] = value
        elif key:
            attrs[(i,)] = BaseBackend.parse_attr(key)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({k: v for k, v in kwargs.items() if k not in names})
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    pointers = " ".join(kind[1:] for kind in signature.values() if kind.startswith("*"))
    return triton.compile(src, target=target, options=options.__dict__), constexprs, pointers


def ptxas_report(compiled, arch: int) -> dict:
    """Registers per thread and spilled bytes from ``ptxas -v``, shared memory from Triton's metadata."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
             f.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return {"regs": int(regs.group(1)) if regs else None, "spill": sum(spills), "smem": compiled.metadata.shared}


def resident_warps(regs: int, num_warps: int, regs_per_sm: int = 65536, max_warps: int = 64) -> int:
    """Warps of one kernel an SM can hold at once as registers allow (allocated per warp in units of 256)."""
    per_warp = -(-regs * 32 // 256) * 256
    programs = min(regs_per_sm // (per_warp * num_warps), max_warps // num_warps, 32)
    return programs * num_warps


def gather_dot_tiles() -> None:
    """``gather_dot_triton`` at shapes for which ``tile_config`` picks each of its tiles, bf16 inputs."""
    for log_l in range(MAX_BLOCK_L.bit_length()):
        for log_d in range(MAX_BLOCK_D.bit_length()):
            L, d = 1 << log_l, 1 << log_d
            gather_dot_triton(torch.randn(8, d, dtype=torch.bfloat16), torch.randint(0, 8, (2, L)),
                              torch.randn(2, d, dtype=torch.bfloat16))  # fmt: skip


def cases(T: int, d: int) -> dict:
    """Each op's wrapper at the benchmark config (on CPU tensors: only the launches matter)."""
    L, N, H, n, k = 128, 1 << 16, 4, 1024, 32
    experts, peer_ids = 4096, torch.randint(0, 4096, (T, 8 * 16))  # PEER: 8 heads x top-16 experts
    values = torch.randn(N, d, dtype=torch.bfloat16)
    indices = torch.randint(0, N, (T, L))
    weights = torch.rand(T, L)
    grad_out = torch.randn(T, d, dtype=torch.bfloat16)
    hot = indices.clone()
    hot[:, : CHUNK // T + 1] = 7  # one row read more than CHUNK times: the sorted backward's chunked path
    rows = torch.randperm(N)[: T * L // 2]
    row_grads = torch.randn(len(rows), d, dtype=torch.bfloat16)
    moments = [torch.zeros(N, d, dtype=torch.bfloat16) for _ in range(2)]
    s1, s2 = torch.randn(2, T, H, n).unbind(0)
    return {
        "bag forward": lambda: bag_forward_triton(values, indices, weights),
        "bag backward sorted (both grads, one pass)": lambda: bag_backward_triton(values, indices, weights, grad_out),
        "bag backward sorted, a hot row": lambda: bag_backward_triton(values, hot, weights, grad_out, sparse=True),
        "bag backward atomics": lambda: bag_backward_triton(values, indices, weights, grad_out, "atomics"),
        "bag value grad sorted alone": lambda: value_grad_triton(indices, weights, grad_out, N, "sorted", True),
        "bag value grad atomics sparse": lambda: value_grad_triton(indices, weights, grad_out, N, "atomics", True),
        "bag weight grad alone": lambda: weight_grad_triton(values, indices, grad_out),
        "gather_dot PEER u.x (fp32 u, bf16 x)": lambda: gather_dot_triton(torch.randn(experts, d), peer_ids, grad_out),
        "gather_dot float64": lambda: gather_dot_triton(
            torch.randn(experts, d, dtype=torch.float64), peer_ids, torch.randn(T, d, dtype=torch.float64)
        ),
        "gather_dot every tile of tile_config": gather_dot_tiles,
        "row Adam": lambda: row_adam_triton(values, *moments, rows, row_grads, 1e-3, 0.9, 0.999, 1e-8, 1),
        "row Adagrad": lambda: row_adagrad_triton(values, torch.zeros(N), rows, row_grads, 1e-2, 1e-8),
        "row SGD": lambda: row_sgd_triton(values, rows, row_grads, 1e-1),
        "top-k select": lambda: product_key_select_triton(s1, s2, k, select_config(n, k, torch.device("cuda"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dim", type=int, default=1024)
    a = parser.parse_args()
    target = GPUTarget("cuda", a.arch, 32)
    torch.manual_seed(0)
    seen, rows, failures = set(), [], []
    for case, kernel, args, kwargs in record_launches(cases(a.tokens, a.dim)):
        try:
            compiled, constexprs, pointers = compile_launch(kernel, args, kwargs, target)
        except Exception as e:  # noqa: BLE001 (report every kernel, then fail)
            failures.append(f"{case}: {kernel.__name__}: {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        meta = {k: str(v) if isinstance(v, tl.dtype) else v for k, v in constexprs.items() if k.isupper()}
        meta["num_warps"] = kwargs.get("num_warps", 4)
        key = (kernel.__name__, str(meta), pointers)
        if key in seen:
            continue
        seen.add(key)
        rows.append((case, kernel.__name__, meta, pointers, ptxas_report(compiled, a.arch)))
    print(f"Triton {triton.__version__}, target sm_{a.arch}, tokens={a.tokens}, d={a.dim}")
    print(f"{'case':<44} {'kernel':<28} {'regs':>4} {'spill B':>7} {'smem B':>6} {'warps/SM':>8}  config  pointers")
    for case, name, meta, pointers, r in rows:
        warps = resident_warps(r["regs"], meta["num_warps"])
        print(f"{case:<44} {name:<28} {r['regs']:>4} {r['spill']:>7} {r['smem']:>6} {warps:>8}  {meta}  {pointers}")
    print("warps/SM: most warps of the kernel one SM holds at once as its registers allow (of 64 on sm_90)")
    if failures:
        sys.exit("kernels that did not compile:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
