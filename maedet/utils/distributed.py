"""Process-group helpers: rank/world queries, launch from ``torchrun`` variables, gathering.

All functions work unchanged in a single process without ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, List

import torch
import torch.distributed as dist

from maedet.utils.errors import ConfigError

__all__ = [
    "is_dist",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main_process",
    "init_distributed",
    "synchronize",
    "all_gather_object",
    "gather_object",
    "all_reduce_mean",
    "destroy_distributed",
]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join the process group described by ``torchrun``'s environment, if any.

    Uses NCCL when the device is CUDA and gloo otherwise. Returns the device this
    process should compute on (``cuda:LOCAL_RANK``, ``cuda`` or ``cpu``).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not is_dist():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", get_local_rank()) if is_dist() else torch.device("cuda")
    return torch.device(device)


def destroy_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def synchronize() -> None:
    """Barrier across all processes (no-op in a single process)."""
    if not is_dist() or get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank receives the list of ``obj`` from all ranks, in rank order."""
    if get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> List[Any]:
    """Rank ``dst`` receives the list of ``obj`` from all ranks; others get ``[]``."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out if out is not None else []


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (returns a new tensor; input unchanged)."""
    if get_world_size() == 1:
        return value.clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()
