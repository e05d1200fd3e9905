"""Compile every memlayers Triton kernel for a GPU, without a GPU, and print what ptxas reports.

    python benchmarks/compile_check.py [--arch 90] [--tokens 64] [--dim 1024] [--jobs 2]

Each kernel is compiled ahead of time exactly as its wrapper launches it at the paper-scale
config (L = 4 heads x k = 32 rows per token, d = 1024, bf16 table, n = 1024 sub-keys, half dim
256; fewer tokens, which changes grids, not kernels): the wrappers run on CPU tensors with
Triton's launcher replaced by a recorder, then each recorded launch is compiled with Triton's own
argument specialisation (dtypes, 16-divisibility, ints equal to 1) for the target ``sm_<arch>``
(90: H100 and H200), and ``ptxas -v`` gives registers per thread, spilled bytes and the shared
memory per program, ``nvdisasm`` the SASS instructions, once per kernel, constexprs, warps and
pointer dtypes (launches that differ only in 16-divisibility compile once). ``gather_dot_triton``
(also the bag's weight gradient) is compiled as well at every tile its ``tile_config`` can pick,
and with float64 and mixed table/x dtypes. The product-key selection kernel is compiled at every
configuration ``select_config`` picks over the supported range (every n <= N_MAX, k <= min(n,
K_MAX), float32 and bfloat16 scores) and at each of ``SWEEP_CONFIGS`` (n = 1024, k = 32); its SASS
count is the code of one row's pass, each loop body once (a row runs the half loop twice, the
bisection loops about twice each, the rare tie branch not at all: see ``triton_select.py``).
This catches what the CPU interpreter cannot (kernels that do not compile, register spills,
shared memory over the limit) on machines without a GPU; it does not time anything. Run it in a
process without ``TRITON_INTERPRET=1`` (the kernels must be real ``triton.jit`` functions);
``--jobs`` processes compile in parallel.
"""

import argparse
import inspect
import multiprocessing
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
from memlayers.ops.bag_update.triton_kernel import bag_update_triton
from memlayers.ops.embedding_bag.triton_forward import bag_forward_triton
from memlayers.ops.gather_dot.triton_kernel import MAX_BLOCK_D, MAX_BLOCK_L, gather_dot_triton
from memlayers.ops.product_key_topk import K_MAX, N_MAX
from memlayers.ops.product_key_topk.triton_select import (
    SWEEP_CONFIGS,
    kernel_constexprs,
    product_key_select_triton,
    select_config,
)
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


def specialize(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple:
    """A recorded launch as the JIT specialises it: (signature, constexprs, attrs, options), where ints
    equal to 1 and None become constexprs and attrs hold the 16-divisibility of pointers and ints."""
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
    return signature, constexprs, attrs, {k: v for k, v in kwargs.items() if k not in names}


def compile_key(kernel: JITFunction, spec: tuple) -> tuple[str, dict, str]:
    """(kernel name, constexprs in capitals and num_warps, pointer element types e.g. "bf16 i64 fp32"):
    what the table prints, and what tells two compiled kernels apart here."""
    signature, constexprs, _, options = spec
    meta = {k: str(v) if isinstance(v, tl.dtype) else v for k, v in constexprs.items() if k.isupper()}
    meta["num_warps"] = options.get("num_warps", 4)
    pointers = " ".join(kind[1:] for kind in signature.values() if kind.startswith("*"))
    return kernel.__name__, meta, pointers


def compile_launch(kernel: JITFunction, spec: tuple, target: GPUTarget):
    """Compile one specialised launch for ``target`` as the JIT would."""
    signature, constexprs, attrs, options = spec
    backend = triton.compiler.make_backend(target)
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=backend.parse_options(options).__dict__)


def ptxas_report(compiled, arch: int) -> dict:
    """Registers per thread and spilled bytes from ``ptxas -v``, shared memory from Triton's metadata,
    SASS instructions (NOPs aside) from ``nvdisasm`` of the cubin."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}", ptx, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
        sass = subprocess.run(
            [os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True
        ).stdout
    regs = re.search(r"Used (\d+) registers", out)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    instructions = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(\S+)", sass, re.MULTILINE)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill": sum(spills),
        "smem": compiled.metadata.shared,
        "sass": sum(1 for op in instructions if op != "NOP"),
    }


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


def bag_update_variants(T: int, d: int, N: int = 1 << 16) -> None:
    """``bag_update_triton`` (the optimizer inside the backward) as the fused path launches it, each call
    launching its levels (first: gather, carries; last): every rule on a bf16 table with lr/step tensors
    and the weight gradient, and with Python-float lr/step; stochastic rounding with a tensor and an int
    seed; an fp32 and an fp16 table; rows wider than MAX_BLOCK_D (column blocks, Adagrad's two sweeps);
    narrow rows (groups of 16)."""
    E = T * 128
    ids, weights, src_rows = torch.randint(0, N, (E,)), torch.rand(E), torch.randint(0, T, (E,))
    tensors = {"lr": torch.tensor(1e-3), "step": torch.tensor(3)}
    dw = torch.empty(E)

    def run(rule, dtype=torch.bfloat16, width=d, **kw):
        p = torch.randn(N, width, dtype=dtype)
        state = {"adam": {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)},
                 "adagrad": {"sum_sq": torch.zeros(N)}, "sgd": {}}[rule]  # fmt: skip
        bag_update_triton(p, state, ids, weights, src_rows, torch.randn(T, width, dtype=dtype), rule, **{**tensors, **kw})

    for rule in ("adam", "adagrad", "sgd"):
        run(rule, weight_grad_out=dw)
        run(rule, lr=1e-3, step=3)
    run("adam", seed=torch.tensor(1))
    run("adam", seed=12345)
    run("adam", torch.float32, weight_grad_out=dw)
    run("adam", torch.float16)
    for rule in ("adam", "adagrad"):
        run(rule, width=5000, weight_grad_out=dw)
    run("sgd", width=37, weight_grad_out=dw)


def cases(T: int, d: int) -> dict:
    """Each op's wrapper at the benchmark config (on CPU tensors: only the launches matter)."""
    L, N = 128, 1 << 16
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
    return {
        "bag forward": lambda: bag_forward_triton(values, indices, weights),
        "bag backward sorted (both grads, one pass)": lambda: bag_backward_triton(values, indices, weights, grad_out),
        "bag backward sorted, a hot row": lambda: bag_backward_triton(values, hot, weights, grad_out, sparse=True),
        "bag backward sorted, rows wider than a block": lambda: bag_backward_triton(
            torch.randn(N, 5000, dtype=torch.bfloat16), indices, weights, torch.randn(T, 5000, dtype=torch.bfloat16)
        ),
        "bag_update, every variant": lambda: bag_update_variants(T, d),
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
        "top-k select, every config of the table": select_table,
        "top-k select, SWEEP_CONFIGS": select_sweep,
    }


def select_table() -> None:
    """The selection kernel at one (n, k) per configuration ``select_config`` picks for CUDA over the
    supported range, float32 and bfloat16 scores (2 tokens x 2 heads: no argument specialised to 1)."""
    table = {}
    for n in range(1, N_MAX + 1):
        for k in range(1, min(n, K_MAX) + 1):
            config = select_config(n, k, torch.device("cuda"))
            table.setdefault(str((kernel_constexprs(n, k, config), config)), (n, k, config))
    for n, k, config in table.values():
        for dtype in (torch.float32, torch.bfloat16):
            s = torch.randn(2, 2, n, dtype=dtype)
            product_key_select_triton(s, s, k, config)


def select_sweep() -> None:
    """The selection kernel at each configuration ``benchmarks/kernels.py`` times (n = 1024, k = 32)."""
    for config in SWEEP_CONFIGS:
        for dtype in (torch.float32, torch.bfloat16):
            s = torch.randn(2, 2, 1024, dtype=dtype)
            product_key_select_triton(s, s, 32, config)


_UNIQUE: list = []  # (case, kernel, spec) per compile key, shared with the forked workers


def _compile_one(i_arch: tuple[int, int]):
    """Compile ``_UNIQUE[i]`` in a worker: (report, None) or (None, error line)."""
    i, arch = i_arch
    case, kernel, spec = _UNIQUE[i]
    try:
        return ptxas_report(compile_launch(kernel, spec, GPUTarget("cuda", arch, 32)), arch), None
    except Exception as e:  # noqa: BLE001 (report every kernel, then fail)
        return None, f"{case}: {kernel.__name__}: {type(e).__name__}: {str(e).splitlines()[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=2, help="compiling processes")
    a = parser.parse_args()
    torch.manual_seed(0)
    keys = {}
    for case, kernel, args, kwargs in record_launches(cases(a.tokens, a.dim)):
        spec = specialize(kernel, args, kwargs)
        name, meta, pointers = compile_key(kernel, spec)
        if (name, str(meta), pointers) not in keys:
            keys[(name, str(meta), pointers)] = len(_UNIQUE)
            _UNIQUE.append((case, kernel, spec))
    jobs = [(i, a.arch) for i in range(len(_UNIQUE))]
    if a.jobs > 1:  # forked workers inherit the recorded launches
        with multiprocessing.get_context("fork").Pool(a.jobs) as pool:
            results = pool.map(_compile_one, jobs, chunksize=1)
    else:
        results = [_compile_one(job) for job in jobs]
    print(f"Triton {triton.__version__}, target sm_{a.arch}, tokens={a.tokens}, d={a.dim}")
    print(
        f"{'case':<44} {'kernel':<28} {'regs':>4} {'spill B':>7} {'smem B':>6} {'warps/SM':>8} {'SASS':>6}  config  pointers"
    )
    for (case, kernel, spec), (r, _) in zip(_UNIQUE, results):
        if r is not None:
            name, meta, pointers = compile_key(kernel, spec)
            warps = resident_warps(r["regs"], meta["num_warps"])
            print(
                f"{case:<44} {name:<28} {r['regs']:>4} {r['spill']:>7} {r['smem']:>6} {warps:>8} {r['sass']:>6}  "
                f"{meta}  {pointers}"
            )
    print("warps/SM: most warps of the kernel one SM holds at once as its registers allow (of 64 on sm_90)")
    print("SASS: instructions in the kernel's code (NOPs aside)")
    failures = [error for _, error in results if error is not None]
    if failures:
        sys.exit("kernels that did not compile:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
