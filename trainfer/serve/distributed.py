"""``torch.distributed`` helpers: one process per rank when launched by ``torchrun``, else one.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in each process's environment;
:func:`setup` reads them and joins the group (NCCL when CUDA is available, gloo on CPU). Every
helper also works in a plain single process, where it answers rank 0 of a world of 1, so callers
never branch on "am I distributed".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (``WORLD_SIZE`` and ``RANK`` set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and this process has joined a group."""
    return dist.is_available() and dist.is_initialized()


def setup() -> torch.device:
    """Join the process group described by the torchrun environment; return this rank's device.

    Outside torchrun nothing is initialised. Calling it twice is harmless.
    """
    cuda = torch.cuda.is_available()
    if launched_by_torchrun() and not is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def cleanup() -> None:
    """Leave the process group (if joined)."""
    if is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the group (0 in a single process)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes in the group (1 in a single process)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its machine, from torchrun's ``LOCAL_RANK`` (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the one process that prints and writes files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def shard_indices(length: int) -> range:
    """This rank's share of ``range(length)``: every ``world_size``-th index from ``rank``.

    The shards are disjoint and cover every index exactly once (no padding), so sums reduced
    across ranks count each sample once.
    """
    return range(rank(), length, world_size())


def all_reduce_sum(values: Mapping[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Sum each named number over all ranks (identity in a single process).

    Reduce sums and counts, then divide: averages of averages are wrong when shards differ in size.
    """
    if not is_initialized():
        return {key: float(value) for key, value in values.items()}
    if device is None:
        device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = torch.tensor([float(values[key]) for key in values], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(values, packed.tolist()))


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` in a single process).

    Pickled between this job's own processes only; never use it on data from outside the job.
    """
    if not is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` (picklable) on every rank; other ranks' ``value`` is ignored."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) to every rank, in place."""
    if not is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


#: Environment variables through which torchrun tells a process its place in the group.
TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def single_process_environment() -> dict[str, str]:
    """This process's environment without torchrun's variables: for a child process that must run
    on its own (e.g. a CLI call from rank 0) instead of trying to join this job's group."""
    return {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}
