"""Serving memories: value tables kept in 8 bits, one float32 scale per row (``quantize_values``)."""

from torch import nn

from .optim.groups import value_stores

FORMATS = ("int8", "fp8")


def quantize_values(model: nn.Module, fmt: str = "int8") -> dict:
    """Store every value table of ``model`` (a shared pool once) in ``fmt``, "int8" or "fp8" (float8_e4m3fn), with
    one float32 scale per row, in place; a read dequantises only the rows it reads. For serving: the tables no
    longer train (the rest of the model still can) and the state dict holds ``qweight``/``scale`` instead of
    ``weight``, so quantise after loading a checkpoint. Returns {"tables", "bytes_before", "bytes_after"} (of
    the value tables). Raises ValueError, before changing anything, when a store cannot (PEER's and UltraMem's
    stores, for now) or nothing is left to quantise."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_values: fmt must be one of {FORMATS}, got {fmt!r}")
    stores = [s for s in value_stores(model) if s.param_roles().get("values")]
    if not stores:
        raise ValueError("quantize_values: the model has no value tables left to quantise (none, or done already)")
    refused = sorted({type(s).__name__ for s in stores if not s.quantizable})
    if refused:
        raise ValueError(
            f"quantize_values: {', '.join(refused)} cannot keep its values in 8 bits yet (only value tables read as "
            "weighted bags can: pkm, memory, memory_plus, engram); nothing was changed"
        )
    before = sum(p.numel() * p.element_size() for s in stores for p in s.param_roles()["values"])
    for store in stores:
        store.quantize_(fmt)
    after = sum(b.numel() * b.element_size() for s in stores for b in s.buffers(recurse=False))
    return {"tables": len(stores), "bytes_before": before, "bytes_after": after}


__all__ = ["FORMATS", "quantize_values"]
