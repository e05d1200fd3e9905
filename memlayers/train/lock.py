"""One process per run directory: an advisory lock on ``out_dir/.memlayers.lock``.

    with lock_run_dir("runs/a"):     # RunDirBusyError if another live process holds it
        ...

The lock is ``flock`` on a file that stays in the directory (removing it would let a third process lock
a fresh file while the second still holds the old one). The kernel releases it when its holder exits,
however it exits (SIGKILL included), so a crashed run never leaves a stale lock. The holder writes its
pid into the file, for the error message of whoever finds the directory busy. On platforms without
``fcntl`` (Windows), and on a read-only file system (where no run can write), there is no lock.
"""

import contextlib
import errno
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

LOCK = ".memlayers.lock"


class RunDirBusyError(ValueError):
    """Another process is using the run directory."""


@contextlib.contextmanager
def lock_run_dir(out_dir: str | os.PathLike):
    """Hold the lock of ``out_dir`` (which must exist) for the ``with`` block."""
    path = Path(out_dir) / LOCK
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        yield  # a read-only file system: nobody can write here, so there is nothing to guard (reading a result)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusyError(
                f"{out_dir} is in use by another memlayers process (pid {holder}); wait for it to finish or stop "
                "it, or use another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
