"""Serving memories: value tables kept in 8 bits with one float32 scale per row (``quantize_values``), and value
tables kept off the compute device, in host memory or in memory-mapped files (``offload_values``)."""

import os

from torch import nn

from .memory.stores.servable import FORMATS as _FORMATS
from .optim.groups import value_stores

FORMATS = tuple(_FORMATS)
PLACES = ("host", "disk")


def _tables(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: store} of the stores of ``model`` that hold value tables (a shared pool once)."""
    names = {id(m): name for name, m in model.named_modules()}
    return {names[id(s)] or "store": s for s in value_stores(model) if s.root() is s}


def _refuse(stores, what: str) -> None:
    refused = sorted({type(s).__name__ for s in stores if not s.servable})
    if refused:
        raise ValueError(
            f"{what}: {', '.join(refused)} cannot (every memory kind's own store can; a store sharded over processes "
            "cannot: serve from one process); nothing was changed"
        )


def _bytes(stores) -> int:
    return sum(t.numel() * t.element_size() for s in stores for t in s.stored().values())


def quantize_values(model: nn.Module, fmt: str = "int8") -> dict:
    """Store every value table of ``model`` (a shared pool once) in ``fmt``, "int8" or "fp8" (float8_e4m3fn), with
    one float32 scale per row, in place; a read dequantises only the rows it reads. For serving: the tables no
    longer train (the rest of the model still can) and the state dict holds ``q{name}``/``{name}_scale`` instead
    of each table ``name`` (``qweight``/``weight_scale``; PEER: ``qu``, ``u_scale``, ``qv``, ``v_scale``), so
    quantise after loading a checkpoint (and before ``offload_values``). Returns {"tables", "bytes_before",
    "bytes_after"} (of the value tables). Raises ValueError, before changing anything, when a store cannot (one
    sharded over processes) or nothing is left to quantise."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_values: fmt must be one of {FORMATS}, got {fmt!r}")
    stores = [s for s in _tables(model).values() if s.param_roles().get("values")]
    if not stores:
        raise ValueError(
            "quantize_values: the model has no value tables left to quantise (none, done already, or offloaded)"
        )
    _refuse(stores, "quantize_values")
    before = _bytes(stores)
    for store in stores:
        store.quantize_(fmt)
    return {"tables": len(stores), "bytes_before": before, "bytes_after": _bytes(stores)}


def offload_values(model: nn.Module, where: str = "host", directory: str | None = None) -> dict:
    """Keep every value table of ``model`` (a shared pool once; 8-bit ones too) off the compute device, in place:
    ``where="host"`` in CPU memory, ``where="disk"`` written to new files ``<directory>/<module name>.<tensor>.bin``
    and memory-mapped from there, so that RAM holds only the pages of the rows read (the table must fit in RAM
    once, when it is written). Moving the model (``model.to("cuda")``, before or after) no longer moves them, and
    each read brings only the distinct rows it reads to the device (off the CPU through pinned memory). Reads are
    exactly the reads of the tables in place. For serving: the tables stop training; the state dict still holds
    their values (a load writes them into host memory or the files). The files are not deleted at exit.

    Returns {"tables", "bytes" (of the tables moved), "files" (for "disk")}. Raises ValueError (FileExistsError
    for a file that exists), before changing anything, on a bad ``where``/``directory``, a store that cannot (one
    sharded over processes), or no table left in place. A file that cannot be written (a full disk) raises OSError
    naming it; the stores offloaded before it stay offloaded (their reads are exact), the rest stay in place."""
    if where not in PLACES:
        raise ValueError(f"offload_values: where must be one of {PLACES}, got {where!r}")
    if (where == "disk") != (directory is not None):
        raise ValueError("offload_values: give a directory for where='disk' (and only for it), for the table files")
    tables = {name: s for name, s in _tables(model).items() if not s.offloaded}
    if not tables:
        raise ValueError("offload_values: the model has no value tables left in place (none, or offloaded already)")
    _refuse(tables.values(), "offload_values")
    prefixes = {name: None for name in tables}
    if where == "disk":
        prefixes = {name: os.path.join(directory, f"{name}.") for name in tables}
        files = [p + t + ".bin" for name, p in prefixes.items() for t in tables[name].stored()]
        for path in files:
            if os.path.exists(path):
                raise FileExistsError(f"offload_values: {path} exists; offload to an empty directory")
        os.makedirs(directory, exist_ok=True)
    moved = _bytes(tables.values())
    for name, store in tables.items():
        store.offload_(where, prefixes[name])
    return {"tables": len(tables), "bytes": moved, **({"files": files} if where == "disk" else {})}


__all__ = ["FORMATS", "PLACES", "offload_values", "quantize_values"]
