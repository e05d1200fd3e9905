"""What the numba kernels (``ops/*/cpu_*.py``) share: numba's OpenMP layer, which runs in torch's own thread pool,
and how many of torch's threads a kernel takes."""

import os

import numba
import torch

if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    # OpenMP first: numba's OpenMP layer binds to the libgomp torch loaded (one runtime, one pool) instead of a
    # second pool whose threads would compete with torch's spinning ones for the cores
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def threads_for(work: int, per_thread: int) -> int:
    """min(torch's threads, numba's, work / per_thread), at least 1; numba set to it when more than 1 (1: no thread
    pool is touched, so a forked child running torch on one thread, as DataLoader workers do, stays safe; like
    torch's own parallel ops, the pool does not survive a fork)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, -(-work // per_thread)))
    if threads > 1:
        numba.set_num_threads(threads)
    return threads
