"""torchrun integration: process group from the environment, rank-0 I/O, device per local rank."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..common.system import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the process that prints results and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU) and pick this rank's device."""
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    dev = resolve_device(device, info.local_rank)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` stacked in rank order (just `t[None]` outside torchrun); a collective: all ranks call it."""
    if not dist.is_initialized():
        return t.detach().clone()[None]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.stack(parts)


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (a collective under torchrun), so all ranks take the same branch."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())
