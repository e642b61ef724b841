"""Run by torchrun from test_fsdp.py: a few FSDP2 (fully_shard) steps of a sparsified conv net over gloo."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from nmsparse import is_nm, sparsity_report, weight_masks

from ddp_worker import build, train


def shard(model, mesh):
    """fully_shard every conv/linear layer, then the root: the FSDP2 recipe, after sparsify."""
    for module in model:
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model) -> dict:
    """The whole state dict on every rank: sharded parameters gathered, buffers as they are."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def main(out_dir: str, method: str) -> None:
    method, _, mode = method.partition(":")  # "rescale:attach": masks attached to the optimizer
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = shard(build(method), mesh)
    train(model, steps=5, rank=rank, world=world, attach=mode == "attach")
    state = full_state(model)
    # Outside forward and backward a sharded layer's weight is a local shard: unshard to read whole weights.
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    report = {r["layer"]: r["density"] for r in sparsity_report(model) if "layer" in r}
    assert is_nm(model[2].weight, 2, 4, dim=1) and is_nm(model[4].weight, 2, 4, dim=1)
    for m in sharded:
        m.reshard()
    torch.save({"state": state, "report": report, "masks": {k: v.clone() for k, v in weight_masks(model).items()},
                "sharded": sorted(k for k, v in model.state_dict().items() if isinstance(v, DTensor))},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
