"""Smoke tests of the GPU benchmarks (benchmarks/layer_gpu.py, kernels.py, gpu_checks.sh) at tiny sizes on
CPU, so that a lent GPU's minutes are not spent on a script that crashes: every section runs and prints its
table with the expected rows and columns. Nothing is timed or judged here."""

import importlib
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
COLUMNS = ["what", "measured", "target", "meets target?", "note"]


@pytest.fixture(scope="module")
def bench(one_thread):
    """The benchmark scripts as modules (their directory on sys.path, as when run as scripts)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("targets", "layer_gpu", "kernels")}
    finally:
        sys.path.remove(str(BENCH))


def tables(text: str) -> dict[str, list[list[str]]]:
    """{title: [header, row, ...]} of the markdown tables in ``text`` (title: the line before the table)."""
    out, title, lines = {}, None, text.splitlines()
    for prev, line in zip([""] + lines, lines):
        if not line.startswith("|"):
            continue
        if not prev.startswith("|"):
            title = prev
            out[title] = []
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not set("".join(cells)) <= {"-", ":"}:  # not the separator row
            out[title].append(cells)
    return out


def one_table(text: str, title_start: str) -> tuple[list[str], dict[str, list[str]]]:
    found = [rows for title, rows in tables(text).items() if title.startswith(title_start)]
    assert len(found) == 1, f"expected one table titled {title_start!r} in:\n{text}"
    header, *rows = found[0]
    return header, {r[0]: r for r in rows}


def assert_measured(row: list[str]) -> None:
    assert row[1].endswith((" ms", "x", "tok/s", "dense)")) and not row[1].startswith("failed"), row
    assert row[3].startswith(("n/a (CPU run)", "-")), row  # a CPU run judges nothing


def run_layer_gpu(bench, capsys, section: str) -> str:
    bench["layer_gpu"].main(["--device", "cpu", "--sections", section])
    return capsys.readouterr().out


def test_verdict_and_not_judged(bench):
    import torch

    t = bench["targets"]
    assert t.verdict(2.4, 2.5, None) == "yes" and t.verdict(2.6, 2.5, None) == "no"
    assert t.verdict(0.85, 0.8, None, at_least=True) == "yes" and t.verdict(0.75, 0.8, None, at_least=True) == "no"
    assert t.verdict(float("nan"), 2.5, None) == t.verdict(1.0, float("nan"), None) == "n/a (not measured)"
    assert t.verdict(1.0, 2.5, "CPU run") == "n/a (CPU run)"
    assert t.not_judged(torch.device("cpu"), dict(t.FULL)) == "CPU run"
    assert t.not_judged(torch.device("cuda"), dict(t.FULL)) is None
    assert t.not_judged(torch.device("cuda"), dict(t.FULL, tokens=1024)) == "not the target config"


def test_time_phases_times_each_phase(bench):
    import torch

    calls = []
    out = bench["targets"].time_phases(
        [lambda: calls.append("a"), lambda: (time.sleep(0.002), calls.append("b"))], torch.device("cpu"), 1, 3
    )
    assert calls == ["a", "b"] * 4  # warm-up first, the phases in order
    assert len(out) == 3 and out[1] >= 2.0 and out[2] >= out[1] > out[0] >= 0


def test_layer_gpu_kernels(bench, capsys):
    header, rows = one_table(run_layer_gpu(bench, capsys, "kernels"), "Kernels")
    assert header == COLUMNS
    expected = ["bag forward", "bag fwd+bwd, dense value grad", "bag fwd+bwd, sparse value grad",
                "bag fwd+bwd, sparse / dense", "scoring + exact top-k fwd, fp32",
                "scoring + exact top-k fwd+bwd, fp32", "scoring + exact top-k fwd+bwd, the layer's autocast"]  # fmt: skip
    assert list(rows) == expected
    for row in rows.values():
        assert_measured(row)
    assert rows["bag fwd+bwd, dense value grad"][2] == "<= 2.5 ms"
    assert rows["scoring + exact top-k fwd+bwd, fp32"][2] == "<= 1.0 ms"


def test_layer_gpu_layer(bench, capsys):
    lg = bench["layer_gpu"]
    header, rows = one_table(run_layer_gpu(bench, capsys, "layer"), "Whole Memory+ layer")
    assert header == COLUMNS
    ffn = [name for name in rows if name.startswith("SwiGLU FFN fwd+bwd+AdamW step (hidden ")]
    assert len(ffn) == 1 and rows[ffn[0]][1].endswith(" ms")
    fused = lg.fused_keyword() is not None
    for label, _, is_fused in lg.VARIANTS:
        row = rows[f"Memory+ layer fwd+bwd+update, {label}"]
        if is_fused and not fused:
            assert row[1] == lg.NO_FUSED
            continue
        assert_measured(row)
        assert row[2].startswith("<= 2x FFN = ") and "step" in row[4]
        assert_measured(rows[f"ratio layer / FFN, {label}"])
        if label != lg.VARIANTS[0][0]:
            assert_measured(rows[f"sparse / dense layer, {label}"])


def test_layer_gpu_update(bench, capsys):
    lg = bench["layer_gpu"]
    header, rows = one_table(run_layer_gpu(bench, capsys, "update"), "Value update at growing N")
    assert header == COLUMNS
    fused = lg.fused_keyword() is not None
    for n in (16, 32, 64):
        for kind in ("AdamW, dense grad", "SparseRowAdam", "SparseRowAdagrad", "fused sparse_adam update"):
            row = rows[f"value update, N = {n * n:,}, {kind}"]
            if kind.startswith("fused") and not fused:
                assert row[1] == lg.NO_FUSED
                continue
            assert_measured(row)
            assert row[2].startswith("- (the N = 256 reference)" if n == 16 else "<= 1.2x N = 256: ")
            assert row[4].endswith(" rows touched"), row


def test_layer_gpu_profile_splits_the_step(bench, capsys):
    lg = bench["layer_gpu"]
    header, rows = one_table(run_layer_gpu(bench, capsys, "profile"), "Memory+ layer fwd+bwd+step by piece")
    assert header == ["piece"] + [label for label, _, _ in lg.VARIANTS]
    assert list(rows) == list(lg.PIECES) + ["total"]
    dense = {piece: float(row[1]) for piece, row in rows.items()}  # the AdamW column
    for piece in ("query projection/norm fwd", "query projection/norm bwd", "scoring fwd", "scoring bwd", "select",
                  "bag fwd", "bag bwd (value grad)", "readout fwd", "readout bwd", "optimizer"):  # fmt: skip
        assert dense[piece] > 0, f"nothing attributed to {piece!r}: {rows}"
    assert dense["total"] == pytest.approx(sum(v for k, v in dense.items() if k != "total"), abs=0.01)
    assert dense["other"] < 0.5 * dense["total"]
    if lg.fused_keyword() is None:
        assert rows["total"][-1] == lg.NO_FUSED
    else:  # the fused update runs in the table's post-accumulate-grad hook
        assert float(rows[lg.ACCUMULATE][-1]) > 0 and float(rows["total"][-1]) > 0


def test_profile_split_of_cuda_kernels(bench):
    """The GPU branch of split_pieces, on hand-made profiler events: kernels go to the piece of the op that
    launched them (backward ones through autograd's sequence numbers), unlinked ones by their name."""
    import torch

    lg = bench["layer_gpu"]
    CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, parent=None, seq=-1, thread=1, fwd_thread=0, kernels=(), device=CPU, us=0.0):
        k = [types.SimpleNamespace(name=n, duration=d) for n, d in kernels]
        span = types.SimpleNamespace(elapsed_us=lambda: us)
        return types.SimpleNamespace(name=name, cpu_parent=parent, sequence_nr=seq, thread=thread,
                                     fwd_thread=fwd_thread, kernels=k, device_type=device, time_range=span)  # fmt: skip

    addressing = event(lg.RANGE + "addressing", kernels=[("_product_key_select_kernel", 30)])
    bag = event(lg.RANGE + "bag", kernels=[("_bag_forward_kernel", 40)])
    optimizer = event(lg.RANGE + "optimizer", kernels=[("multi_tensor_apply_kernel", 10)])
    bag_bwd = event(lg.BACKWARD + "SinkBagFunctionBackward", seq=7, thread=2, fwd_thread=1)
    bmm_bwd = event(lg.BACKWARD + "BmmBackward0", seq=5, thread=2, fwd_thread=1)
    accumulate = event(lg.BACKWARD + "torch::autograd::AccumulateGrad", thread=2, kernels=[("_segment_kernel", 60)])
    cpu = [
        addressing, bag, optimizer, bag_bwd, bmm_bwd, accumulate,
        event("aten::einsum", addressing, seq=5, kernels=[("sm90_gemm", 20)]),
        event("aten::topk", addressing, kernels=[("topk_kernel", 3)]),  # no autograd: the selection
        event("aten::empty", bag, seq=7),
        event("aten::bmm", bmm_bwd, thread=2, kernels=[("sm90_gemm", 25)]),
        event("aten::mul", bag_bwd, thread=2, kernels=[("_weight_grad_kernel", 8), ("elementwise", 50)]),
    ]  # fmt: skip
    ran = [("_product_key_select_kernel", 30), ("_bag_forward_kernel", 40), ("multi_tensor_apply_kernel", 10),
           ("_segment_kernel", 60), ("sm90_gemm", 45), ("topk_kernel", 3), ("_weight_grad_kernel", 8),
           ("elementwise", 50), ("_row_adam_kernel", 15), ("unknown", 5)]  # fmt: skip
    devices = [event(name, device=CUDA, us=us) for name, us in ran]
    got = {k: v for k, v in lg.split_pieces(cpu + devices, "cuda").items() if v}
    assert got == {"select": 33, "scoring fwd": 20, "scoring bwd": 25, "bag fwd": 40, "bag bwd (value grad)": 50,
                   "weight grad": 8, "optimizer": 25, lg.ACCUMULATE: 60, "other": 5}  # fmt: skip


def test_layer_gpu_train(bench, capsys):
    pytest.importorskip("omegaconf")
    from memlayers.train import TrainConfig

    header, rows = one_table(run_layer_gpu(bench, capsys, "train"), "Training tokens/s")
    assert header == COLUMNS
    expected = ["training tokens/s, dense", "training tokens/s, memory_plus"]
    if "fused_values" in TrainConfig.__dataclass_fields__:
        expected.append("training tokens/s, memory_plus, fused value update")
    assert list(rows) == expected + ["training tokens/s, moe"]
    for row in rows.values():
        assert_measured(row)
    assert rows["training tokens/s, moe"][2] == ">= 0.7x dense"
    assert rows["training tokens/s, memory_plus"][2] == ">= 0.8x dense"


def test_kernels_script_reports_failing_rows_and_goes_on(bench, capsys, monkeypatch):
    import torch

    from memlayers.ops.embedding_bag import triton_backward
    from memlayers.ops.product_key_topk import triton_select

    def broken(*args, **kwargs):
        raise RuntimeError("kernel changed\nsecond line")

    monkeypatch.setattr(triton_backward, "value_grad_triton", broken)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    good = triton_select.select_config(16, 4, device)
    bad = {"ROWS": good["ROWS"], "num_warps": 1}  # no TL_TOPK: the launch fails
    monkeypatch.setattr(triton_select, "SWEEP_CONFIGS", [good, bad], raising=False)
    bench["kernels"].main(["--tiny", "--select-budget", "600"])
    out = capsys.readouterr().out
    lines = {line.split("  ")[0].rstrip(): line for line in out.splitlines()}
    assert "T=8 L=4 N=64 d=32 bf16" in out and "product-key top-k: T=4 H=2 n=16 k=4" in out
    for op in ("torch F.embedding_bag fwd", "ours bwd piece: weight grad", "ours fwd+bwd sorted (sparse)",
               "reference fwd+bwd", "ours fwd+bwd", f"select kernel only {good}"):  # fmt: skip
        assert op in lines and "failed" not in lines[op], out
    assert lines[f"select kernel only {good}"].endswith("default")
    assert "failed: " in lines[f"select kernel only {bad}"], out
    for algo in ("atomics", "sorted"):  # only the rows of the broken function fail, with its first line
        for kind in ("dense", "sparse"):
            assert lines[f"ours bwd piece: value grad {algo} {kind}"].endswith("failed: RuntimeError: kernel changed")


def test_gpu_checks_sections(tmp_path):
    out = subprocess.run(
        ["bash", str(BENCH / "gpu_checks.sh"), "--dry-run", "--sweep"],
        capture_output=True, text=True, env=dict(os.environ, OUT=str(tmp_path)), timeout=60, check=True,
    ).stdout  # fmt: skip
    sections = [line.split(" (timeout ")[0][3:] for line in out.splitlines() if line.startswith("== ")]
    assert sections == ["env", "tests", "layer_gpu", "train", "kernels", "serving"]
    limits = [int(line.split("(timeout ")[1].split(" s)")[0]) for line in out.splitlines() if line.startswith("== ")]
    assert sum(limits) <= 8 * 60
    assert "tests/test_embedding_bag_triton.py" in out and "tests/test_product_key_topk_triton.py" in out
    assert "benchmarks/kernels.py --select-budget 30 --sweep" in out
    assert "benchmarks/layer_gpu.py --sections train" in out
    assert "tests/test_serving.py" in out and "benchmarks/offloaded_values.py --device cuda" in out
    assert not list(tmp_path.iterdir())  # a dry run writes no logs


def test_layer_cpu_steps_prints_every_arm():
    """``layer_cpu.py --steps`` (the CPU training-step table of RESULTS.md): one row per arm asked for, the
    dense arm at 1.00x."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "layer_cpu.py"), "--steps", "--arms", "dense,memory", "--repeats", "1",
         "--threads", "1"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    header, rows = one_table(out, "")
    assert header[0] == "arm" and set(rows) == {"dense", "memory"}
    assert rows["dense"][-1] == "1.00" and float(rows["memory"][-1]) > 0


def test_distributed_bytes_measured_equal_computed():
    """``benchmarks/distributed.py``: the bytes each rank sends, counted at the collectives, are the README's
    formulas (exactly for columns; rows route uniform ids, so within a few percent)."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "distributed.py"), "--groups", "2", "--rows", "1000", "--dim", "16",
         "--tokens", "64", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    lines = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| column", "| row"))]
    ratios = {cells[0].strip(): float(cells[4]) for cells in lines}
    assert ratios["column"] == 1.0 and abs(ratios["row"] - 1) < 0.05, out


def test_scale_on_paper_prints_every_configuration():
    out = subprocess.run(
        [sys.executable, str(BENCH / "scale_on_paper.py")], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.count("## ") == 3 and out.count("| 512 |") >= 5  # three tables, to 512 GPUs


def test_hf_load_memory_prints_its_table():
    pytest.importorskip("transformers")
    out = subprocess.run(
        [sys.executable, str(BENCH / "hf_load_memory.py"), "--layers", "2", "--dim", "64", "--n-keys", "32"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    size, resident, anonymous = (cell.strip() for cell in out.strip().splitlines()[-1].split("|")[1:-1])
    assert size.endswith(" MiB") and resident.endswith("x)") and anonymous.endswith("x)"), out
