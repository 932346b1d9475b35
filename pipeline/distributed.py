"""torch.distributed under `torchrun`: the rank, world size and device of this process.

Run any stage as `torchrun --nproc_per_node N stages/....py ...` (or multi-node torchrun); the
same commands without torchrun run a single process. The process group is set up from the
environment torchrun provides (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on
GPUs, gloo on CPUs. No other cluster code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and the store's final attributes."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64, on every rank)."""
        if self.world_size == 1:
            return list(values)
        # NCCL reduces only CUDA tensors; gloo only CPU ones.
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (on this rank's device) over all ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor


def distributed() -> Distributed:
    """This process's place in the run, initialising the process group once if launched by
    torchrun with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world_size == 1:
        return Distributed(device=device)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)
