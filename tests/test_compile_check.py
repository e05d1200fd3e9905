"""Every Triton kernel compiles for the H100/H200 architecture (sm_90), checked without a GPU.

The CPU interpreter runs the kernels' Python, not the compiler: a kernel can pass every interpreted
test and still fail to compile (types, constexpr scoping, shared memory). ``benchmarks/compile_check.py``
compiles each kernel as its wrapper launches it, in a process without ``TRITON_INTERPRET``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent


def launched_kernels() -> set[str]:
    """Names of the ``@triton.jit`` functions the ops launch (by convention they end in ``_kernel``)."""
    names = set()
    for path in (REPO / "memlayers" / "ops").rglob("*.py"):
        names |= set(re.findall(r"@triton\.jit(?:\(.*\))?[^\n]*\ndef (\w+_kernel)\(", path.read_text()))
    return names


def tile_configs() -> set[tuple[int, int]]:
    """Every (BLOCK_L, BLOCK_D) ``gather_dot``'s ``tile_config`` picks, over L and d up to 8193."""
    from memlayers.ops.gather_dot.triton_kernel import tile_config

    sizes = sorted({(1 << i) + e for i in range(14) for e in (-1, 0, 1)} - {0})
    return {(c["BLOCK_L"], c["BLOCK_D"]) for L in sizes for d in sizes for c in [tile_config(L, d)]}


def select_table() -> set[str]:
    """Every selection-kernel configuration the CUDA dispatcher picks over the supported range, plus the
    benchmark's sweep, as the table prints them (constexprs, then the score dtype of both pointers)."""
    import torch

    from memlayers.ops.product_key_topk import K_MAX, N_MAX
    from memlayers.ops.product_key_topk.triton_select import SWEEP_CONFIGS, kernel_constexprs, select_config

    configs = [(1024, 32, c) for c in SWEEP_CONFIGS]
    configs += [
        (n, k, select_config(n, k, torch.device("cuda")))
        for n in range(1, N_MAX + 1)
        for k in range(1, min(n, K_MAX) + 1)
    ]
    rows = set()
    for n, k, config in configs:
        for dtype, name in (("fp32", "False"), ("bf16", "True")):
            meta = {"ROWS": config["ROWS"], **kernel_constexprs(n, k, config), "BF16_SUM": name == "True"}
            meta = {**meta, "TL_TOPK": config["TL_TOPK"], "num_warps": config["num_warps"]}
            rows.add(f"{meta}  {dtype} {dtype} i64 i32 i32 i32 i64")
    return rows


def test_every_kernel_compiles_for_sm90():
    kernels = launched_kernels()
    assert len(kernels) >= 8  # the regex still finds them
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compile_check.py"), "--tokens", "16", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    table = result.stdout
    assert kernels <= set(re.findall(r"\b(_\w+_kernel)\b", table)), f"kernels without a compile case: {kernels}"
    assert "'GATHER': False" in table  # the chunked path's second-level sum was compiled too
    gather_dot_rows = [line for line in table.splitlines() if "_gather_dot_kernel" in line]
    tiles = re.findall(r"'BLOCK_L': (\d+), 'BLOCK_D': (\d+)", "\n".join(gather_dot_rows))
    # every tile the bag's weight gradient and gather_dot can pick was compiled
    assert {(int(bl), int(bd)) for bl, bd in tiles} == tile_configs()
    assert any("'ACC': 'fp64'" in line for line in gather_dot_rows)
    assert any(line.endswith("fp32 i64 bf16 fp32") for line in gather_dot_rows)  # fp32 table, bf16 x
    select_rows = [line for line in table.splitlines() if "_product_key_select_kernel" in line]
    compiled = {line[line.index("{") :] for line in select_rows}
    assert compiled == select_table()  # each configuration the dispatcher or the benchmark can pick, once
    rows = re.findall(r"(_\w+_kernel)\s+(\d+)\s+(\d+)", table)
    assert len(rows) >= len(kernels)
    for name, regs, spill in rows:
        assert 0 < int(regs) <= 255 and int(spill) == 0, name  # a spill here is a slow kernel on the GPU
