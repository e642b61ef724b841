"""FSDP2 (torch.distributed.fsdp.fully_shard) over gloo with two CPU processes launched by torchrun.

A sparsified model (SR-STE 2:4 weights, SDGP rescale 2:4 on the data gradient) sharded with fully_shard
trains like one process on the whole batch.
"""

import sys
from pathlib import Path

import pytest
import torch

from nmsparse import is_nm
from nmsparse.nn.state import remove_plain_layout

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402
from test_distributed import run_torchrun  # noqa: E402

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)", allow_module_level=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["", ":attach"])
def test_fully_shard_two_processes_equal_one(tmp_path, mode):
    r0, r1 = run_torchrun(tmp_path, "rescale" + mode, "fsdp_worker.py")
    # the weights really were sharded: the parametrized originals and the dense layers' parameters
    assert "2.parametrizations.weight.original" in r0["sharded"] and "8.weight" in r0["sharded"]
    # attached, each optimizer step gathers the sharded weights to compute the masks
    single = ddp_worker.train(ddp_worker.build("rescale"), steps=5, attach=bool(mode))
    # Sharded (DTensor) weights keep the parametrization layout; the one-process reference in that layout too.
    for mod in single.modules():
        remove_plain_layout(mod)
    ref = single.state_dict()
    assert r0["state"].keys() == r1["state"].keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # both ranks hold the same model
        if v.is_floating_point():
            # float reassociation in the sharded reduction (SDGP can flip a near-tie: see test_distributed.py)
            assert torch.allclose(r0["state"][k], v, atol=5e-4), (k, float((r0["state"][k] - v).abs().max()))
        else:  # masks and step counters
            assert torch.equal(r0["state"][k], v), k
    assert int(r0["state"]["2.parametrizations.weight.0.step"]) == 5 and int(r0["state"]["2.sdgp_step"]) == 5
    for name, mask in r0["masks"].items():
        assert is_nm(mask, 2, 4, dim=1), name
    assert r0["report"] == r1["report"] == {"2": 0.5, "4": 0.5}  # sparsity_report on the unsharded model
