"""Issue 11's benchmark of a Memory+ layer as training runs it, every row against its target.

    PYTHONPATH=. python benchmarks/layer_gpu.py                    # GPU: kernels, layer, update, profile
    PYTHONPATH=. python benchmarks/layer_gpu.py --sections train   # training tokens/s (needs omegaconf)
    PYTHONPATH=. python benchmarks/layer_gpu.py --device cpu       # tiny sizes on CPU (also without CUDA)
    PYTHONPATH=. python benchmarks/layer_gpu.py --tiny             # tiny sizes on the GPU

Config (``targets.FULL``, DESIGN.md §4): T = 16,384 tokens, 4 heads x k = 32, N = 1024^2 values, d = 1024,
bf16 value tables under bf16 autocast. On CPU (``--device cpu``, automatic without CUDA) the sizes are
``targets.TINY``, float32 without autocast as the trainer runs there, and nothing is judged: a smoke test.

Each timed iteration does what a training step does: gradients set to None, forward, backward and, where a
row says so, the optimizer step; CUDA events between the phases, warm-up iterations first, the median of
``--iters``. Sections (``--sections``, comma-separated; "all" adds train):

kernels  bag forward (against the copy ceiling); bag fwd+bwd with dense and with sparse value gradients;
         product-key scoring + exact top-k fwd and fwd+bwd, fp32 and under the layer's autocast.
layer    the model's SwiGLU FFN at this width (fwd+bwd+AdamW step), then the whole Memory+ layer
         fwd+bwd+value update with each value optimizer: dense AdamW, SparseRowAdam, SparseRowAdagrad and
         the update fused into the backward (``build_optimizer(..., fused_values=True)`` where this
         memlayers has it); each against 2x the FFN, each sparse path against the dense one.
update   the value update alone at N = 1M, 4M, 16M rows for the same touched rows (the bag reads indices in
         [0, 1M) at every N): the optimizer step of the unfused optimizers; for the fused update, its bag
         fwd+bwd+update minus the plain sparse bag fwd+bwd at that N.
profile  torch.profiler: the layer's fwd+bwd+step split into pieces, ms per iteration (CUDA kernel time on
         a GPU, CPU time on CPU), one column per value optimizer. Forward work is told apart by
         record_function ranges opened by hooks on the layer's parts (the query projection and norm, the
         addressing, the store, the readout); in the addressing, ops autograd records are "scoring", the
         rest (no_grad) "select"; backward work goes to the forward op it differentiates (autograd's
         sequence numbers); the selection, weight-gradient and row-update kernels by their names wherever
         they run. "weight grad" counts only a kernel of its own (the sorted backward computes it inside
         the value-gradient pass, the CPU reference inside the bag's backward); the fused update runs in
         the table's post-accumulate-grad hook; "other" holds the rest (usage tracking, reshapes, zero_grad).
train    tokens/s of the dense, Memory+ (and Memory+ with the fused update, where the trainer has it) and MoE
         arms of ``memlayers compare --preset gpu`` (``--preset cpu``, shrunk, on CPU) over ``--train-steps``
         steps through ``memlayers.train.train`` without evaluation, the first log window (compilation,
         autotuning) left out.
"""

import argparse
import collections
import contextlib
import gc
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
from types import SimpleNamespace

import torch
from targets import (
    BAG_FWD_BWD_MS,
    BAG_FWD_CEILING,
    FULL,
    LAYER_OVER_FFN,
    MEMORY_ARM_SPEED,
    MOE_ARM_SPEED,
    SPARSE_OVER_DENSE,
    TINY,
    TOPK_FWD_BWD_MS,
    UPDATE_GROWTH,
    Row,
    failed_row,
    first_line,
    ms,
    not_judged,
    print_grid,
    print_table,
    sync,
    time_ms,
    time_phases,
    verdict,
)

import memlayers
from memlayers.ops import embedding_bag, product_key_topk

SECTIONS = ("kernels", "layer", "update", "profile", "train")
# (row label, value_optimizer, fused)
VARIANTS = (
    ("AdamW, dense values", "adamw", False),
    ("SparseRowAdam (sparse_adam)", "sparse_adam", False),
    ("SparseRowAdagrad (sparse_adagrad)", "sparse_adagrad", False),
    ("fused sparse_adam update", "sparse_adam", True),
)
NO_FUSED = "n/a (no fused update)"


def fused_keyword() -> str | None:
    """The keyword of ``build_optimizer`` that fuses the value update into the backward, if it has one."""
    params = inspect.signature(memlayers.build_optimizer).parameters
    return next((k for k in ("fused_values", "fused") if k in params), None)


def free(b) -> None:
    """Hand the GPU memory of what was dropped back (the next row may need all of it)."""
    if b.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def grad_for(b, y: torch.Tensor) -> torch.Tensor:
    """A fixed random output gradient of y's shape and dtype (made once per shape and dtype)."""
    key = (tuple(y.shape), y.dtype)
    if key not in b.grads:
        b.grads[key] = torch.randn(y.shape, device=b.device).to(y.dtype)
    return b.grads[key]


def optimizer_kwargs(value_optimizer: str, fused: bool) -> dict | None:
    """build_optimizer's keywords for a variant; None when it asks for a fused update this memlayers lacks."""
    kw = {"value_optimizer": value_optimizer}
    if fused:
        key = fused_keyword()
        if key is None:
            return None
        kw[key] = True
    return kw


# ---- kernels --------------------------------------------------------------------------------------


def kernel_rows(b) -> list[Row]:
    return bag_rows(b) + topk_rows(b)


def bag_rows(b) -> list[Row]:
    c, dev = b.cfg, b.device
    T, d, n, H, k = c["tokens"], c["dim"], c["n_keys"], c["heads"], c["topk"]
    N, L = n * n, H * k
    rows = []
    big = torch.empty((1 << 30) if dev.type == "cuda" else (1 << 22), dtype=torch.bfloat16, device=dev)
    copy_ms = time_ms(big.clone, dev, b.warmup, b.iters)
    ceiling = 2 * big.nbytes / (copy_ms * 1e-3)  # bytes read and written per second
    clone = f"clone of {big.nbytes >> 20} MiB"
    big = None
    free(b)
    values = (0.02 * torch.randn(N, d, device=dev)).to(b.table_dtype).requires_grad_()
    indices = torch.randint(0, N, (T, L), device=dev)
    weights = torch.rand(T, L, device=dev, requires_grad=True)
    grad_out = torch.randn(T, d, device=dev).to(b.table_dtype)

    def forward():
        with torch.no_grad():
            embedding_bag(values, indices, weights)

    try:
        fwd = time_ms(forward, dev, b.warmup, b.iters)
        moved = (T * L + T) * d * values.element_size()
        frac = moved / (fwd * 1e-3) / ceiling
        rows.append(Row(
            "bag forward", ms(fwd), f">= {BAG_FWD_CEILING:.0%} of the copy ceiling ({ceiling / 1e12:.2f} TB/s)",
            verdict(frac, BAG_FWD_CEILING, b.judged, at_least=True),
            f"{moved / (fwd * 1e-3) / 1e12:.2f} TB/s = {frac:.0%} of the ceiling ({clone})",
        ))  # fmt: skip
    except Exception as e:  # noqa: BLE001 (one failing row must not cost the others)
        rows.append(failed_row("bag forward", e))
    bag = {}
    for sparse in (False, True):
        what = f"bag fwd+bwd, {'sparse' if sparse else 'dense'} value grad"

        def step(sparse=sparse):
            values.grad = weights.grad = None
            embedding_bag(values, indices, weights, sparse_grad=sparse).backward(grad_out)

        try:
            bag[sparse] = t = time_ms(step, dev, b.warmup, b.iters)
            rows.append(Row(what, ms(t), f"<= {BAG_FWD_BWD_MS} ms", verdict(t, BAG_FWD_BWD_MS, b.judged)))
        except Exception as e:  # noqa: BLE001
            rows.append(failed_row(what, e))
        values.grad = weights.grad = None
        free(b)
    if len(bag) == 2:
        r = bag[True] / bag[False]
        rows.append(Row("bag fwd+bwd, sparse / dense", f"{r:.2f}x", f"<= {SPARSE_OVER_DENSE:.2f}x",
                        verdict(r, SPARSE_OVER_DENSE, b.judged)))  # fmt: skip
    return rows


def topk_rows(b) -> list[Row]:
    c, dev = b.cfg, b.device
    T, H, n, k = c["tokens"], c["heads"], c["n_keys"], c["topk"]
    h = c["dim"] // 4  # half of the Memory+ preset's key_dim (dim / 2)
    q1, q2 = (torch.randn(T, H, h, device=dev, requires_grad=True) for _ in range(2))
    k1, k2 = ((h**-0.5 * torch.randn(H, n, h, device=dev)).requires_grad_() for _ in range(2))
    leaves = (q1, q2, k1, k2)
    autocast_note = "bf16 autocast" if dev.type == "cuda" else "no autocast on CPU"
    rows = []

    def forward():
        with torch.no_grad():
            product_key_topk(q1, q2, k1, k2, k)

    def fwd_bwd(autocast):
        def step():
            for leaf in leaves:
                leaf.grad = None
            with autocast():
                scores, _ = product_key_topk(q1, q2, k1, k2, k)
            scores.backward(grad_for(b, scores))

        return step

    cases = (
        ("scoring + exact top-k fwd, fp32", forward, "- (fwd+bwd <= 1.0 ms)", ""),
        ("scoring + exact top-k fwd+bwd, fp32", fwd_bwd(contextlib.nullcontext), None, ""),
        ("scoring + exact top-k fwd+bwd, the layer's autocast", fwd_bwd(b.autocast), None, autocast_note),
    )
    for what, fn, target, note in cases:
        try:
            t = time_ms(fn, dev, b.warmup, b.iters)
            if target is None:
                rows.append(Row(what, ms(t), f"<= {TOPK_FWD_BWD_MS} ms", verdict(t, TOPK_FWD_BWD_MS, b.judged), note))
            else:
                rows.append(Row(what, ms(t), target, "-", note))
        except Exception as e:  # noqa: BLE001
            rows.append(failed_row(what, e))
    return rows


# ---- the whole layer ------------------------------------------------------------------------------


def build_layer(b, value_optimizer: str, fused: bool):
    """(Memory+ layer at the config, its optimizer from ``memlayers.build_optimizer``); None if unavailable."""
    kw = optimizer_kwargs(value_optimizer, fused)
    if kw is None:
        return None
    c = b.cfg
    with torch.device(b.device):
        layer = memlayers.MemoryLayer.from_preset(
            "memory_plus", c["dim"], n_keys=c["n_keys"], heads=c["heads"], topk=c["topk"],
            sparse_values=value_optimizer != "adamw",
        )  # fmt: skip
    layer.to(b.device)  # anything a constructor made on the CPU explicitly
    layer.store.to(b.table_dtype)
    layer.train()
    return layer, memlayers.build_optimizer(layer, lr=1e-3, **kw)


def step_phases(b, model, opt, x) -> list:
    """[zero_grad + forward + backward, optimizer step]: a training step on ``x``."""

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        x.grad = None
        with b.autocast():
            y = model(x)
        y.backward(grad_for(b, y))

    return [fwd_bwd, opt.step]


def build_ffn(b):
    from memlayers.model import ModelConfig
    from memlayers.model.transformer import SwiGLU

    d = b.cfg["dim"]
    hidden = b.ffn_hidden or ModelConfig(dim=d).hidden
    with torch.device(b.device):
        ffn = SwiGLU(d, hidden).to(b.device)
    return ffn, memlayers.build_optimizer(ffn, lr=1e-3), hidden


def layer_rows(b) -> list[Row]:
    dev = b.device
    x = torch.randn(b.cfg["tokens"], b.cfg["dim"], device=dev, requires_grad=True)
    rows = []
    try:
        ffn, opt, hidden = build_ffn(b)
        fb, st, ffn_ms = time_phases(step_phases(b, ffn, opt, x), dev, b.warmup, b.iters)
        rows.append(Row(f"SwiGLU FFN fwd+bwd+AdamW step (hidden {hidden})", ms(ffn_ms), "- (the baseline)", "-",
                        f"fwd+bwd {fb:.3f} + step {st:.3f} ms"))  # fmt: skip
        del ffn, opt
    except Exception as e:  # noqa: BLE001
        rows.append(failed_row("SwiGLU FFN fwd+bwd+AdamW step", e))
        ffn_ms = float("nan")
    free(b)
    limit = LAYER_OVER_FFN * ffn_ms
    totals = {}
    for label, value_optimizer, fused in VARIANTS:
        what = f"Memory+ layer fwd+bwd+update, {label}"
        try:
            built = build_layer(b, value_optimizer, fused)
            if built is None:
                rows.append(Row(what, NO_FUSED))
                continue
            layer, opt = built
            fb, st, total = time_phases(step_phases(b, layer, opt, x), dev, b.warmup, b.iters)
            totals[label] = total
            rows.append(Row(what, ms(total), f"<= {LAYER_OVER_FFN:g}x FFN = {limit:.3f} ms",
                            verdict(total, limit, b.judged), f"fwd+bwd {fb:.3f} + step {st:.3f} ms"))  # fmt: skip
            del built, layer, opt
        except Exception as e:  # noqa: BLE001
            rows.append(failed_row(what, e))
        free(b)
    for label, total in totals.items():
        r = total / ffn_ms
        rows.append(Row(f"ratio layer / FFN, {label}", f"{r:.2f}x", f"<= {LAYER_OVER_FFN:g}x",
                        verdict(r, LAYER_OVER_FFN, b.judged)))  # fmt: skip
    dense = totals.get(VARIANTS[0][0])
    for label, total in list(totals.items())[1:] if dense else []:
        r = total / dense
        rows.append(Row(f"sparse / dense layer, {label}", f"{r:.2f}x", f"<= {SPARSE_OVER_DENSE:.2f}x",
                        verdict(r, SPARSE_OVER_DENSE, b.judged)))  # fmt: skip
    return rows


# ---- the value update at growing N ----------------------------------------------------------------


def table_step_ms(b, num_rows: int, indices, weights, grad_out, value_optimizer: str | None, fused: bool):
    """(fwd+bwd, step, total) ms of a bag over a (num_rows, d) ValueTable and its optimizer step;
    ``value_optimizer`` None: a sparse-gradient bag with no optimizer (step 0)."""
    sparse = value_optimizer != "adamw"
    table = memlayers.ValueTable(num_rows, b.cfg["dim"], sparse_grad=sparse, dtype=b.table_dtype, device=b.device)
    opt = None if value_optimizer is None else memlayers.build_optimizer(
        table, lr=1e-3, **optimizer_kwargs(value_optimizer, fused))  # fmt: skip

    def fwd_bwd():
        table.weight.grad = weights.grad = None
        table(indices, weights).backward(grad_out)

    phases = [fwd_bwd] if opt is None else [fwd_bwd, opt.step]
    out = time_phases(phases, b.device, b.warmup, b.iters)
    return (out[0], 0.0, out[-1]) if opt is None else tuple(out)


def update_rows(b) -> list[Row]:
    c, dev = b.cfg, b.device
    T, d, L = c["tokens"], c["dim"], c["heads"] * c["topk"]
    first = b.update_keys[0] ** 2
    indices = torch.randint(0, first, (T, L), device=dev)
    weights = torch.rand(T, L, device=dev, requires_grad=True)
    grad_out = torch.randn(T, d, device=dev).to(b.table_dtype)
    touched = indices.unique().numel()
    kinds = [("AdamW, dense grad", "adamw", False), ("SparseRowAdam", "sparse_adam", False),
             ("SparseRowAdagrad", "sparse_adagrad", False), ("fused sparse_adam update", "sparse_adam", True)]  # fmt: skip
    have_fused = fused_keyword() is not None
    rows, base = [], {}
    for n in b.update_keys:
        N = n * n
        bag_only = float("nan")
        if have_fused:
            try:
                bag_only = table_step_ms(b, N, indices, weights, grad_out, None, False)[-1]
            except Exception as e:  # noqa: BLE001
                rows.append(failed_row(f"value update, N = {N:,}: plain sparse bag fwd+bwd", e))
            free(b)
        for label, value_optimizer, fused in kinds:
            what = f"value update, N = {N:,}, {label}"
            if fused and not have_fused:
                rows.append(Row(what, NO_FUSED))
                continue
            try:
                _, st, total = table_step_ms(b, N, indices, weights, grad_out, value_optimizer, fused)
                update = total - bag_only if fused else st
                how = "fwd+bwd+update - plain sparse bag" if fused else "the optimizer step"
                if N == first:
                    base[label] = update
                    target, meets = f"- (the N = {first:,} reference)", "-"
                else:
                    limit = UPDATE_GROWTH * base.get(label, float("nan"))
                    target = f"<= {UPDATE_GROWTH}x N = {first:,}: {limit:.3f} ms"
                    meets = verdict(update, limit, b.judged)
                note = f"{how}; bag fwd+bwd+update {total:.3f} ms; {touched:,} rows touched"
                rows.append(Row(what, ms(update), target, meets, note))
            except Exception as e:  # noqa: BLE001
                rows.append(failed_row(what, e))
            free(b)
    return rows


# ---- profiler breakdown ---------------------------------------------------------------------------

# autograd's AccumulateGrad nodes, and the tables' post-accumulate-grad hooks where the fused update runs
ACCUMULATE = "grad accumulation (+ fused update)"
PIECES = (
    "query projection/norm fwd", "query projection/norm bwd", "scoring fwd", "scoring bwd", "select", "bag fwd",
    "bag bwd (value grad)", "weight grad", "readout fwd", "readout bwd", "optimizer", ACCUMULATE, "other",
)  # fmt: skip
RANGE = "memlayers-bench:"
BACKWARD = "autograd::engine::evaluate_function: "
TAG_PIECE = {"query": "query projection/norm", "bag": "bag", "readout": "readout", "optimizer": "optimizer"}
KERNEL_PIECE = (  # kernel-name fragments that name their piece wherever they run
    ("_product_key_select", "select"),
    ("_weight_grad_kernel", "weight grad"),
    ("gather_dot", "weight grad"),
    ("_row_adam", "optimizer"),
    ("_row_adagrad", "optimizer"),
    ("_row_sgd", "optimizer"),
)


class _Ranges:
    """Forward hooks opening a ``record_function`` range named after a part of the layer around its forward."""

    def __init__(self, layer):
        a = layer.addressing
        parts = [(a, "addressing"), (getattr(a, "query", None), "query"), (getattr(a, "query_norm", None), "query"),
                 (layer.store, "bag"), (layer.readout, "readout")]  # fmt: skip
        self.open, self.handles = {}, []
        for module, tag in parts:
            if isinstance(module, torch.nn.Module):
                self.handles.append(module.register_forward_pre_hook(self._enter(tag)))
                self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, tag):
        def hook(module, args):
            r = torch.profiler.record_function(RANGE + tag)
            r.__enter__()
            self.open.setdefault(id(module), []).append(r)

        return hook

    def _leave(self, module, args, output):
        self.open[id(module)].pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def _locate(event):
    """(innermost bench range tag or "backward" or None, the event just below it on the way up)."""
    child, node = None, event
    while node is not None:
        if node.name.startswith(RANGE):
            return node.name[len(RANGE) :], child
        if node.name.startswith(BACKWARD):
            return "backward", node
        child, node = node, node.cpu_parent
    return None, child


def _forward_base(tag, below) -> str:
    """The piece (without fwd/bwd) of a forward event under range ``tag``; in the addressing, the selection's
    custom op and what autograd does not record (``sequence_nr`` < 0 at the top op: no_grad) are the
    selection, the rest scoring. (The custom op gets a sequence number of its own: on CPU, where no kernel
    name tells, its work went to scoring and the selection read as ~0.)"""
    if tag == "addressing":
        select = below is not None and (below.sequence_nr < 0 or "product_key_select" in below.name)
        return "select" if select else "scoring"
    return TAG_PIECE.get(tag, "other")


def _piece(event, kernel: str | None, forward_of: dict) -> str:
    for fragment, piece in KERNEL_PIECE:
        if kernel is not None and fragment in kernel:
            return piece
    tag, below = _locate(event)
    if tag == "backward" and below.name.endswith("AccumulateGrad"):
        return ACCUMULATE
    if tag == "backward":
        base = forward_of.get((below.fwd_thread, below.sequence_nr)) or forward_of.get(below.sequence_nr, "other")
        return {"bag": "bag bwd (value grad)", "select": "other", "optimizer": "optimizer", "other": "other"}.get(
            base, f"{base} bwd"
        )
    base = _forward_base(tag, below)
    return {"bag": "bag fwd", "select": "select", "optimizer": "optimizer", "other": "other"}.get(base, f"{base} fwd")


def split_pieces(events, device_kind: str) -> dict[str, float]:
    """{piece: microseconds} over the profiled events: CUDA kernel time (``device_kind`` "cuda") or self CPU
    time. Backward work is given to the forward op it differentiates (autograd's sequence numbers)."""
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    forward_of = {}
    for e in cpu:
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD):
            tag, below = _locate(e)
            if tag != "backward":
                base = _forward_base(tag, below)
                forward_of.setdefault((e.thread, e.sequence_nr), base)
                forward_of.setdefault(e.sequence_nr, base)  # should thread ids not match across threads
    out = dict.fromkeys(PIECES, 0.0)
    if device_kind == "cuda":
        linked = collections.Counter()  # kernel name -> us of it linked to a CPU op
        for e in cpu:
            for kernel in e.kernels:
                out[_piece(e, kernel.name, forward_of)] += kernel.duration
                linked[kernel.name] += kernel.duration
        ran = collections.Counter()
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                ran[e.name] += e.time_range.elapsed_us()
        for name, us in ran.items():  # kernels the profiler did not link to an op: by their name alone
            piece = next((p for fragment, p in KERNEL_PIECE if fragment in name), "other")
            out[piece] += max(0.0, us - linked[name])
    else:
        for e in cpu:
            out[_piece(e, None, forward_of)] += e.self_cpu_time_total
    return out


def profile_variant(b, value_optimizer: str, fused: bool, x, iters: int = 3) -> dict[str, float] | None:
    """{piece: ms per iteration} of one layer variant's fwd+bwd+step; None when the variant is unavailable."""
    built = build_layer(b, value_optimizer, fused)
    if built is None:
        return None
    layer, opt = built
    fwd_bwd, step = step_phases(b, layer, opt, x)

    def traced_step():
        with torch.profiler.record_function(RANGE + "optimizer"):
            step()

    for _ in range(2):
        fwd_bwd()
        step()
    ranges = _Ranges(layer)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if b.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        sync(b.device)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(iters):
                fwd_bwd()
                traced_step()
            sync(b.device)
    finally:
        ranges.remove()
    us = split_pieces(prof.events(), b.device.type)
    return {piece: t / iters / 1e3 for piece, t in us.items()}


def profile_table(b) -> None:
    x = torch.randn(b.cfg["tokens"], b.cfg["dim"], device=b.device, requires_grad=True)
    columns = {}
    for label, value_optimizer, fused in VARIANTS:
        try:
            columns[label] = profile_variant(b, value_optimizer, fused, x)
        except Exception as e:  # noqa: BLE001
            columns[label] = first_line(e)
        free(b)
    kind = "CUDA kernel time" if b.device.type == "cuda" else "CPU time"
    lines = []
    for piece in PIECES + ("total",):
        line = [piece]
        for col in columns.values():
            if col is None:
                line.append(NO_FUSED if piece == "total" else "-")
            elif isinstance(col, str):
                line.append(f"failed: {col}" if piece == "total" else "-")
            else:
                line.append(f"{sum(col.values()) if piece == 'total' else col[piece]:.3f}")
        lines.append(line)
    print_grid(f"Memory+ layer fwd+bwd+step by piece: ms per iteration of {kind} (torch.profiler, 3 iterations)",
               ("piece", *columns), lines)  # fmt: skip


# ---- training tokens/s ----------------------------------------------------------------------------


def _window_rates(run_dir: str) -> list[float]:
    """tokens/s of each log window of a run but the first (compilation, autotuning)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return rates[1:] or rates


def train_rows(b) -> list[Row]:
    try:
        from memlayers.compare.presets import get_preset
        from memlayers.compare.runner import arm_configs
        from memlayers.train import TrainConfig, train
    except ImportError as e:
        return [Row("training tokens/s", f"n/a ({first_line(e)}: install memlayers[train] or carry its wheel)")]
    tiny = b.tiny
    preset = get_preset("cpu" if tiny else "gpu")
    steps, every = (4, 2) if tiny else (b.train_steps, max(1, b.train_steps // 4))
    common = [f"train.steps={steps}", f"train.log_every={every}", f"train.ckpt_every={steps}", "train.eval_every=0",
              "train.progress=false", f"train.device={b.device.type}"]  # fmt: skip
    if tiny:
        common += ["train.batch_size=4", "train.seq_len=32"]
    arms = []
    for arm in b.train_arms:
        arms.append((arm, arm, []))
        if arm.startswith("memory") and "fused_values" in TrainConfig.__dataclass_fields__:
            fused = ["train.value_optimizer=sparse_adam", "train.fused_values=true", "train.value_clip=null"]
            arms.append((f"{arm}, fused value update", arm, fused))
    judged = "CPU run" if b.device.type != "cuda" else "tiny run" if tiny else None
    where = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # checkpoints: RAM is faster than disk
    rows, dense, dense_flops = [], None, None
    with tempfile.TemporaryDirectory(dir=where) as root:
        for label, arm, extra in arms:
            what = f"training tokens/s, {label}"
            run_dir = os.path.join(root, label.replace(" ", "_").replace(",", ""))
            try:
                cfg = arm_configs(preset, common + extra, [arm])[arm]
                result = train(cfg, run_dir, evaluate=False, progress=False)
                rate = statistics.median(_window_rates(run_dir))
                flops = result["accounting"]["flops_per_token"]
            except Exception as e:  # noqa: BLE001
                rows.append(failed_row(what, e))
                continue
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
            note = f"{steps} steps of {cfg.train.batch_size} x {cfg.train.seq_len} tokens, preset {preset.name}"
            if arm == "dense":
                dense, dense_flops = rate, flops
                rows.append(Row(what, f"{rate:,.0f} tok/s", "- (the baseline)", "-", note))
                continue
            need = MOE_ARM_SPEED if arm == "moe" else MEMORY_ARM_SPEED
            ratio = rate / dense if dense else float("nan")
            flops_note = f"; {flops / dense_flops:.2f}x dense FLOPs/token" if dense_flops else ""
            rows.append(Row(what, f"{rate:,.0f} tok/s ({ratio:.2f}x dense)", f">= {need}x dense",
                            verdict(ratio, need, judged, at_least=True), note + flops_note))  # fmt: skip
    return rows


# ---- main -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA if available, else CPU (tiny sizes)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for a smoke test (always on CPU)")
    p.add_argument("--sections", default="kernels,layer,update,profile",
                   help=f"comma-separated, of {','.join(SECTIONS)}, or all")  # fmt: skip
    p.add_argument("--tokens", type=int, help="tokens per step (default: 16384; CPU: 64)")
    p.add_argument("--dim", type=int, help="model width d (default: 1024; CPU: 64)")
    p.add_argument("--n-keys", type=int, help="sub-keys per half, N = n_keys^2 (default: 1024; CPU: 16)")
    p.add_argument("--update-n-keys", type=int, nargs="+", help="n_keys of the update section (1024 2048 4096)")
    p.add_argument("--ffn-hidden", type=int, help="SwiGLU hidden width (default: the model's, 8/3 d rounded)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=40, help="steps per training arm (CPU: 4)")
    p.add_argument("--train-arms", default="dense,memory_plus,moe", help="arms of --preset gpu to train")
    a = p.parse_args(argv)
    sections = SECTIONS if a.sections == "all" else tuple(s.strip() for s in a.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)} or all")
    a.sections = sections
    return a


def setup(a) -> SimpleNamespace:
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("layer_gpu.py: --device cuda but torch sees no CUDA device; use --device cpu for the tiny run")
    device = torch.device("cuda" if a.device != "cpu" and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    tiny = a.tiny or not cuda
    cfg = dict(TINY if tiny else FULL)
    for key, value in (("tokens", a.tokens), ("dim", a.dim), ("n_keys", a.n_keys)):
        if value is not None:
            cfg[key] = value
    default_update = [16, 32, 64] if tiny else [1024, 2048, 4096]
    return SimpleNamespace(
        device=device, cfg=cfg, tiny=tiny, judged=not_judged(device, cfg), grads={},
        table_dtype=torch.bfloat16 if cuda else torch.float32,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext,
        warmup=1 if tiny else a.warmup, iters=2 if tiny else a.iters, update_keys=a.update_n_keys or default_update,
        ffn_hidden=a.ffn_hidden, train_steps=a.train_steps, train_arms=a.train_arms.split(","),
    )  # fmt: skip


def main(argv=None) -> None:
    a = parse_args(argv)
    b = setup(a)
    torch.manual_seed(0)
    c = b.cfg
    name = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "CPU"
    name += ", tiny sizes, not judged" if b.tiny else ""
    print(f"{name}; torch {torch.__version__}; T={c['tokens']} d={c['dim']} N={c['n_keys'] ** 2:,} "
          f"heads x k = {c['heads']} x {c['topk']}; value tables {str(b.table_dtype).removeprefix('torch.')}; "
          f"median of {b.iters} after {b.warmup} warm-up; fused update: {fused_keyword() or 'absent'}", flush=True)  # fmt: skip
    tables = {"kernels": ("Kernels", kernel_rows), "layer": ("Whole Memory+ layer", layer_rows),
              "update": ("Value update at growing N, same touched rows", update_rows),
              "train": ("Training tokens/s", train_rows)}  # fmt: skip
    for section in a.sections:
        if section == "profile":
            profile_table(b)
        else:
            title, fn = tables[section]
            print_table(f"{title} ({name})", fn(b))
        free(b)


if __name__ == "__main__":
    main()
