"""torch.distributed set-up from the `torchrun` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

One process per GPU with NCCL, or CPU processes with gloo. Without WORLD_SIZE > 1 nothing is
initialised and every helper degrades to the single-process case.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedSetupError", "DistInfo", "init_distributed", "is_distributed", "barrier", "all_reduce_mean", "all_gather_object",
           "cleanup"]


class DistributedSetupError(RuntimeError):
    """The device or the torchrun environment asked for is not there; the message names the option or
    variable."""

    exit_code = 1  # bevfusion.utils.cli: the run failed on its environment


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment and pick this process's device.

    Args:
        device: "cuda" or "cpu"; default CUDA when available.
        backend: default NCCL for CUDA, gloo for CPU.
    """
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError("--device cuda requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DistributedSetupError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity in a single process."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
