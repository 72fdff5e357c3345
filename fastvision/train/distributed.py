"""Process-group setup so the same entry point runs alone or under ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False  # True when a process group is in use (DDP wrapping, samplers, all-reduce)
    owns_group: bool = False  # we created the group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" → CUDA when available, else CPU; under torchrun each rank takes ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def setup_distributed(device: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or reuse one already initialised.

    NCCL on CUDA, gloo on CPU. A single plain process gets a disabled context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        resolved = resolve_device(device, local_rank)
        return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), enabled=True), resolved
    if world_size <= 1:
        return DistContext(), resolve_device(device, local_rank)
    resolved = resolve_device(device, local_rank)
    dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    context = DistContext(dist.get_rank(), local_rank, dist.get_world_size(), enabled=True, owns_group=True)
    return context, resolved
