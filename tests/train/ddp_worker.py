"""Run by torchrun from test_distributed.py: a few DDP steps of a sparsified conv net over gloo."""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import nmsparse
from nmsparse import GradSparsity, SparsityConfig, WeightNM, sparsify, weight_masks


def build(method: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    return sparsify(net, SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4, method)))


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)


def train(model: nn.Module, steps: int, rank: int = 0, world: int = 1, attach: bool = False) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if attach:  # masks step after each optimizer step (from the whole weights: FSDP2 gathers them)
        nmsparse.attach(model, opt)
    for step in range(steps):
        x, y = batch(step)
        per = len(x) // world
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def main(out_dir: str, method: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(method)
    train(DDP(model), steps=5, rank=rank, world=world)
    torch.save({"state": model.state_dict(), "masks": weight_masks(model)}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
