"""Joining the processes ``torchrun`` started, and deciding things once for all of them."""

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: torch.device, memory: int) -> tuple[torch.device, bool]:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA, each process on the GPU of its LOCAL_RANK)
    unless one is already initialised. Returns this process's device and whether this call started the
    group (then the caller destroys it). Raises on a layout that cannot work, before anything is started."""
    world = world_size()
    if world == 1 and memory > 1:
        raise ValueError(
            f"parallel.memory={memory} shards the value tables over {memory} processes, but this is one process; "
            f"launch with torchrun, e.g. torchrun --nproc-per-node {memory} -m memlayers train ..."
        )
    if world % memory:
        raise ValueError(
            f"parallel.memory={memory} does not divide the {world} processes into memory groups; use a memory "
            f"group size that divides {world}"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world == 1 or dist.is_initialized():
        return device, False
    # torchrun's store outlives a restart of the workers (--max-restarts): keys of the earlier attempt's groups
    # would be read as this one's, so each attempt works under its own prefix
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"memlayers/attempt_{attempt}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    return device, True


def agree(fn):
    """``fn()`` run on rank 0 only, its result (or its exception, raised on every rank) handed to every rank:
    one decision for all, and no rank left waiting in a collective when rank 0 fails."""
    if not dist.is_initialized():
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 (re-raised below, on every rank)
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def all_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
