"""ServableStore: a value store whose row tables can be kept in 8 bits or off the compute device, for serving."""

import os
import tempfile
from contextlib import nullcontext

import torch

from ..parts import ValueStore

FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # 8-bit dtype, its largest value
PREFETCHES = 8  # prefetched row sets kept per store until read


class ServableStore(ValueStore):
    """A store that reads rows of the tables named in ``served_tables`` (its "values" parameters, (N, ·) each).

    ``quantize_(fmt)`` replaces each table ``name`` by the buffers ``q{name}`` (N, ·) 8-bit and ``{name}_scale``
    (N,) float32; ``offload_(where, prefix)`` moves what holds the values off the module (``host``: not moved by
    ``.to()``), into CPU memory or memory-mapped files, keeping them in the state dict. Either way the table stops
    training and the store's forward reads through ``served_rows(rows)``: the distinct rows read, dequantised, on
    the rows' device, and the rows renumbered into them. A subclass sets ``served_tables`` and, in its forward,
    reads ``served_rows`` when ``served`` is True.
    """

    served_tables: tuple[str, ...] = ("weight",)
    servable = True
    quantized: str | None = None  # the 8-bit format after quantize_ (``offloaded``: "host" or "disk" after offload_)
    prefetched: tuple = ()  # (rows, {name: rows fetched}, side stream or None) per prefetch not yet read

    @property
    def served(self) -> bool:
        return self.quantized is not None or self.offloaded is not None

    def value_tables(self) -> list[torch.nn.Parameter]:
        """The tables that still train (none once quantised or offloaded): the store's "values" role."""
        return [self._parameters[n] for n in self.served_tables if n in self._parameters]

    def stored(self) -> dict[str, torch.Tensor]:
        """{name: tensor} of what holds the values, wherever it is."""
        if self.offloaded is not None:
            return dict(self.host)
        names = [(f"q{n}", f"{n}_scale") if self.quantized else (n,) for n in self.served_tables]
        return {name: getattr(self, name) for pair in names for name in pair}

    @torch.no_grad()
    def quantize_(self, fmt: str) -> None:
        """Keep each table in 8 bits, one float32 scale per row (its largest magnitude over the format's largest
        value): "int8" (rounded to the nearest of -127..127) or "fp8" (float8_e4m3fn). In place, for serving."""
        if fmt not in FORMATS:
            raise ValueError(f"{type(self).__name__}.quantize_: fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
        if self.quantized is not None:
            raise ValueError(f"{type(self).__name__}.quantize_: the values are already {self.quantized}")
        if self.offloaded is not None:
            raise ValueError(f"{type(self).__name__}.quantize_: quantise the values before offloading them")
        dtype, largest = FORMATS[fmt]
        for name in self.served_tables:
            w = getattr(self, name).detach().float()
            scale = w.abs().amax(dim=1) / largest  # (N,)
            q = w / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
            delattr(self, name)
            self.register_buffer(f"q{name}", (q.round().clamp(-largest, largest) if fmt == "int8" else q).to(dtype))
            self.register_buffer(f"{name}_scale", scale)
        self.register_load_state_dict_pre_hook(_rename_legacy_scale)
        self.quantized = fmt

    @torch.no_grad()
    def offload_(self, where: str, prefix: str | None = None) -> None:
        """Keep the values off the compute device, for serving: "host" (CPU memory) or "disk" (each stored tensor
        written to the new file ``prefix + name + ".bin"`` and memory-mapped, so RAM holds only the pages read).
        In place; ``.to(device)`` no longer moves them, and a read brings only the distinct rows it reads to the
        ids' device. The state dict still holds the values (a load writes them into the host tensors, through to
        the file for "disk")."""
        if where not in ("host", "disk"):
            raise ValueError(f"{type(self).__name__}.offload_: where must be 'host' or 'disk', got {where!r}")
        if self.offloaded is not None:
            raise ValueError(f"{type(self).__name__}.offload_: the values are already offloaded ({self.offloaded})")
        if (where == "disk") != (prefix is not None):
            raise ValueError(f"{type(self).__name__}.offload_: give a file prefix for 'disk' and only for 'disk'")
        stored = {name: t.detach() for name, t in self.stored().items()}
        if where == "disk":
            files = {name: f"{prefix}{name}.bin" for name in stored}
            for path in files.values():
                if os.path.exists(path):
                    raise FileExistsError(f"{path} exists: offload to an empty directory (files are never overwritten)")
            stored = {name: map_to_file(t, files[name]) for name, t in stored.items()}
        for name in stored:
            delattr(self, name)
        self.host = {name: t.cpu() for name, t in stored.items()}
        self.register_state_dict_post_hook(_save_host_tensors)
        self.register_load_state_dict_pre_hook(_load_host_tensors)
        self.offloaded = where

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start fetching the distinct rows that slot ids ``ids`` (any shape) read, for the read of those ids,
        when offloaded. The host waits for the ids and gathers the rows; on a GPU the copy to the device runs on a
        side stream, so that it overlaps the work queued before the read. At most ``PREFETCHES`` wait at once (one
        per reader of a shared table); an older one is dropped."""
        if self.offloaded is None:
            return
        rows = torch.unique(self.rows(ids))
        stream = torch.cuda.Stream(rows.device) if rows.is_cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(rows.device))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            fetched = (rows, {name: fetch_rows(t, rows) for name, t in self.host.items()}, stream)
        self.prefetched = (*self.prefetched[1 - PREFETCHES :], fetched)

    def served_rows(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """rows (...) int64 rows of the tables -> ({name: (R, ·) the R distinct rows, dequantised (float32) when
        quantised, on rows' device}, rows (...) renumbered into them)."""
        distinct, rows = torch.unique(rows, return_inverse=True)
        held = self._take_prefetched(distinct)
        if held is None:
            held = {n: fetch_rows(t, distinct) for n, t in self.stored().items()}
        if self.quantized is None:
            return held, rows
        return {n: held[f"q{n}"].float() * held[f"{n}_scale"].unsqueeze(1) for n in self.served_tables}, rows

    def _take_prefetched(self, distinct: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The prefetched rows if some are ``distinct`` (then made safe to use on the current stream), else None."""
        found = next((i for i, p in enumerate(self.prefetched) if torch.equal(p[0], distinct)), None)
        if found is None:
            return None
        _, held, stream = self.prefetched[found]
        self.prefetched = self.prefetched[:found] + self.prefetched[found + 1 :]
        if stream is not None:
            current = torch.cuda.current_stream(distinct.device)
            current.wait_stream(stream)
            for t in held.values():
                t.record_stream(current)
        return held

    def served_repr(self) -> str:
        """ ", quantized=int8, offloaded=disk" or what of it applies, for ``extra_repr``."""
        quantized = f", quantized={self.quantized}" if self.quantized else ""
        return quantized + (f", offloaded={self.offloaded}" if self.offloaded else "")


def fetch_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows] on rows' device, for a table anywhere. From the CPU to a GPU, the rows are gathered into pinned
    memory and copied without blocking the host."""
    if table.device == rows.device:
        return table.index_select(0, rows)
    staging = torch.empty((rows.numel(), *table.shape[1:]), dtype=table.dtype, pin_memory=True)
    torch.index_select(table, 0, rows.cpu(), out=staging)
    return staging.to(rows.device, non_blocking=True)


def map_to_file(tensor: torch.Tensor, path: str) -> torch.Tensor:
    """Write ``tensor`` to the new file ``path`` and return it memory-mapped from there (MAP_SHARED: writes go to
    the file). The bytes go to a temporary file of our own first, with its space reserved (a full disk is an
    OSError here, not a crash on a write through the mapping), synced, then linked as ``path``, which fails
    rather than replace a file that appeared meanwhile."""
    nbytes = tensor.numel() * tensor.element_size()
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        try:
            if nbytes and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path} ({nbytes:,} bytes): {e.strerror}; free space or offload "
                          "to another directory") from None  # fmt: skip
        torch.from_file(tmp, shared=True, size=tensor.numel(), dtype=tensor.dtype).copy_(tensor.reshape(-1))
        os.fsync(fd)
        os.link(tmp, path)
    finally:
        os.close(fd)
        os.unlink(tmp)
    # a fresh mapping: none of its pages resident until read
    return torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)


def _save_host_tensors(module: ServableStore, state_dict: dict, prefix: str, local_metadata) -> None:
    for name, t in module.host.items():
        state_dict[prefix + name] = t


def _load_host_tensors(module: ServableStore, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    module.prefetched = ()  # fetched before the values change
    for name, t in module.host.items():
        if prefix + name in state_dict:
            value = state_dict.pop(prefix + name)
            if value.shape != t.shape:
                errors.append(f"size mismatch for {prefix + name}: copying {tuple(value.shape)} into {tuple(t.shape)}")
            else:
                t.copy_(value)
        elif strict:
            missing.append(prefix + name)


def _rename_legacy_scale(module: ServableStore, state_dict, prefix, *args) -> None:
    """A ValueTable quantised before the scales were named per table kept its scale as ``scale``."""
    if (
        module.served_tables == ("weight",)
        and prefix + "scale" in state_dict
        and prefix + "weight_scale" not in state_dict
    ):
        state_dict[prefix + "weight_scale"] = state_dict.pop(prefix + "scale")
