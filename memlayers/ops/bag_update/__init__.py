"""The optimizer update of a value table applied straight from the bag's backward inputs (the optimizer
inside the backward, as FBGEMM's table-batched embeddings do): no value-gradient tensor, no separate step.

    g_r = sum_{e: ids[e] = r} weights[e] * src[src_rows[e]]     (fp32, each row's entries in a fixed order)

then Adam (lazy, ``torch.optim.SparseAdam``'s math), row-wise Adagrad or SGD on the touched rows r, exactly
as ``memlayers.ops.row_update``. ``src`` holds the bags' output gradients (several readers' concatenated),
``src_rows`` the row of ``src`` each entry read into. CUDA tensors go to the Triton kernels
(``triton_kernel.py``: no host sync, capturable) when Triton is installed, everything else to the
plain-PyTorch reference (``reference.py``); both compute the same function (tested against each other).
"""

import numbers

import torch

from ..dispatch import IMPLS, use_triton
from ..row_update import triton_problem
from .reference import bag_update_reference

__all__ = ["RULES", "bag_update", "bag_update_reference"]

RULES = {"adam": ("exp_avg", "exp_avg_sq"), "adagrad": ("sum_sq",), "sgd": ()}


def _check_scalar(name: str, value, device: torch.device, kinds: str) -> None:
    """A Python number or a 0-dim tensor on ``device`` whose dtype is one of ``kinds`` ("float", "int")."""
    if isinstance(value, torch.Tensor):
        ok = ("float" in kinds and value.is_floating_point()) or (
            "int" in kinds and value.dtype in (torch.int64, torch.int32)
        )
        if value.dim() != 0 or not ok or value.device != device:
            raise TypeError(
                f"bag_update: {name} must be a Python number or a 0-dim {kinds} tensor on {device}, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
            )
    elif isinstance(value, bool) or not isinstance(value, numbers.Real if "float" in kinds else numbers.Integral):
        raise TypeError(f"bag_update: {name} must be a Python number or a 0-dim {kinds} tensor, got {value!r}")


def _check_inputs(param, state, ids, weights, src_rows, src, rule, lr, step, beta1, beta2, eps, sr, seed, dw):
    if rule not in RULES:
        raise ValueError(f"bag_update: rule must be one of {tuple(RULES)}, got {rule!r}")
    if param.dim() != 2 or not param.is_floating_point():
        raise ValueError(f"bag_update: param must be a 2-D (N, d) float table, got {param.dtype} {tuple(param.shape)}")
    if not isinstance(state, dict) or set(state) != set(RULES[rule]):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"bag_update: rule {rule!r} needs state with keys {list(RULES[rule])}, got {got}")
    N, d = param.shape
    for name, t in state.items():
        want = (N,) if name == "sum_sq" else (N, d)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != want:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"bag_update: state[{name!r}] must be a float tensor of shape {want}, got {got}")
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"bag_update: ids must be a 1-D (E,) int32/int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
    E = ids.shape[0]
    if weights.shape != (E,) or not weights.is_floating_point():
        raise ValueError(f"bag_update: weights must be a float ({E},) tensor like ids, got {weights.dtype} "
                         f"{tuple(weights.shape)}")  # fmt: skip
    if src_rows.shape != (E,) or src_rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"bag_update: src_rows must be an int64 ({E},) tensor like ids, got {src_rows.dtype} "
                         f"{tuple(src_rows.shape)}")  # fmt: skip
    if src.dim() != 2 or src.shape[1] != d or not src.is_floating_point():
        raise ValueError(f"bag_update: src must be a float (S, {d}) tensor (rows of param's width), got "
                         f"{src.dtype} {tuple(src.shape)}")  # fmt: skip
    if dw is not None and (dw.shape != (E,) or not dw.is_floating_point()):
        raise ValueError(f"bag_update: weight_grad_out must be a float ({E},) tensor, got {dw.dtype} {tuple(dw.shape)}")
    tensors = {"param": param, **state, "ids": ids, "weights": weights, "src_rows": src_rows, "src": src}
    if dw is not None:
        tensors["weight_grad_out"] = dw
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(
            f"bag_update: {', '.join(tensors)} must be on one device, got "
            + ", ".join(str(t.device) for t in tensors.values())
        )
    _check_scalar("lr", lr, param.device, "float")
    if not isinstance(lr, torch.Tensor) and not lr >= 0:
        raise ValueError(f"bag_update: need lr >= 0, got {lr}")
    if rule == "adam":
        if step is None:
            raise ValueError("bag_update: rule 'adam' needs step (the step count including this one, 1 at first)")
        _check_scalar("step", step, param.device, "int or float")
        if not isinstance(step, torch.Tensor) and not step >= 1:
            raise ValueError(f"bag_update: step must be >= 1 (the count including this step), got {step}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"bag_update: need betas in [0, 1), got ({beta1}, {beta2})")
    if rule != "sgd" and not eps > 0:
        raise ValueError(f"bag_update: need eps > 0, got {eps}")
    if sr:
        if param.dtype != torch.bfloat16:
            raise ValueError(f"bag_update: stochastic_rounding needs a bfloat16 param, got {param.dtype}")
        if seed is not None:
            _check_scalar("seed", seed, param.device, "int")


@torch.no_grad()
def bag_update(
    param: torch.Tensor,
    state: dict,
    ids: torch.Tensor,
    weights: torch.Tensor,
    src_rows: torch.Tensor,
    src: torch.Tensor,
    rule: str,
    *,
    lr,
    step=None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    stochastic_rounding: bool = False,
    seed=None,
    impl: str = "auto",
    weight_grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Update the rows of ``param`` (and ``state``) that ``ids`` touch, in place, from the bag's backward inputs.

    Args:
        param: (N, d) float32/bfloat16/float16 table (other float dtypes: reference only). Rows not in
            ``ids`` stay bit-identical.
        state: adam ``{"exp_avg": (N, d), "exp_avg_sq": (N, d)}``; adagrad ``{"sum_sq": (N,)}`` (keep it
            float32); sgd ``{}``. Updated in place on the touched rows.
        ids: (E,) int32/int64 row ids in [0, N), repeats allowed. Not range-checked (that would cost a
            device sync): out-of-range ids write out of bounds.
        weights: (E,) float weight of each entry.
        src_rows: (E,) int64 (or int32) row of ``src`` each entry adds, in [0, S).
        src: (S, d) float: the bags' output gradients, several readers' concatenated.
        rule: "adam" | "adagrad" | "sgd" (``row_update.row_adam_update`` & co.'s math, fp32).
        lr: step size, a Python float or a 0-dim float32 tensor on param's device (read by the kernel:
            no host sync, no recompile when it changes).
        step: Adam only: the step count including this one, a Python int or a 0-dim int64/float32 tensor.
        beta1, beta2, eps: Adam's (eps also Adagrad's) hyper-parameters.
        stochastic_rounding: store the updated bfloat16 param rounded stochastically (unbiased: 16
            random bits added below bf16's mantissa, then dropped) instead of to nearest; bfloat16 only.
        seed: its random seed, an int or a 0-dim int64 tensor on param's device (vary it every step; a
            tensor can change inside a captured CUDA graph); None draws one from torch's generator.
        impl: "auto" (Triton for CUDA tensors when Triton is installed and the kernel takes the dtypes
            and strides, else the reference), "reference", or "triton" (on CPU only under ``TRITON_INTERPRET=1``).
        weight_grad_out: optional (E,) float tensor, overwritten with each entry's weight gradient
            ``<src[src_rows[e]], param[ids[e]]>`` taken before the update (the bag's other gradient; the
            kernel computes it in the same pass, reading each touched row once).

    Returns:
        0-dim float32: sum over the touched rows of g_r·g_r (deterministic), for logging.
    """
    if impl not in IMPLS:  # checked before the inputs: a typo should not read as a shape error
        raise ValueError(f"bag_update: impl must be one of {IMPLS}, got {impl!r}")
    _check_inputs(param, state, ids, weights, src_rows, src, rule, lr, step, beta1, beta2, eps,
                  stochastic_rounding, seed, weight_grad_out)  # fmt: skip
    if stochastic_rounding and seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    args = {"lr": lr, "step": step, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_grad_out": weight_grad_out}
    if use_triton("bag_update", impl, param, triton_problem(param, state, {"src": src})):
        from .triton_kernel import bag_update_triton  # imported lazily: CPU installs need no Triton

        return bag_update_triton(param, state, ids, weights, src_rows, src, rule, seed=seed if stochastic_rounding
                                 else None, **args)  # fmt: skip
    return bag_update_reference(param, state, ids, weights, src_rows, src, rule, stochastic_rounding=stochastic_rounding,
                                seed=seed, **args)  # fmt: skip
