"""nn/profiling.py: the profiler scopes in the hot paths show up under torch.profiler, cost nothing otherwise,
change no value, and do not break torch.compile's graph."""

import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import nmsparse
from nmsparse.nn import profiling
from nmsparse.nn.profiling import GRAD_PRUNE, MASK, MASKING, scope


def model(cfg):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 4))
    return nmsparse.sparsify(net, cfg)


def step(net, x):
    net.zero_grad(set_to_none=True)
    net(x).square().sum().backward()
    return [p.grad.clone() for p in net.parameters()]


def test_scope_is_a_shared_no_op_without_a_profiler():
    assert scope(MASK) is scope(GRAD_PRUNE)  # one nullcontext instance: no record_function is built
    with profile(activities=[ProfilerActivity.CPU]):
        assert scope(MASK) is not scope(MASKING)
    assert profiling.SCOPES == (MASK, MASKING, GRAD_PRUNE)


def test_scopes_are_recorded_and_values_unchanged():
    cfg = nmsparse.SparsityConfig(weight=nmsparse.WeightNM(method="srste"),
                                  grad=nmsparse.GradSparsity(method="rescale", layers="conv+linear"))
    plain, profiled = model(cfg), model(cfg)
    x = torch.randn(2, 8, 4, 4)
    expected = step(plain, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = step(profiled, x)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    counts = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    # 3 sparse layers (the last Linear stays dense): a mask and a masking in forward, SR-STE's decay in backward,
    # and SDGP's pruning of each layer's output gradient (the first conv needs no input gradient)
    assert counts.get(MASK) == 3 and counts.get(MASKING) == 6 and counts.get(GRAD_PRUNE) == 2


@pytest.mark.slow
def test_scopes_do_not_break_the_compiled_graph():
    import torch._dynamo
    from torch._dynamo.utils import counters

    net = model(nmsparse.SparsityConfig(weight=nmsparse.WeightNM(method="fixed")))
    ref = copy.deepcopy(net)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # a graph break would raise
    x = torch.randn(2, 8, 4, 4)
    breaks = sum(counters["graph_break"].values())
    for _ in range(2):
        assert all(torch.allclose(a, b) for a, b in zip(step(ref, x), step(compiled, x)))
    with profile(activities=[ProfilerActivity.CPU]):
        step(compiled, x)
    assert sum(counters["graph_break"].values()) == breaks
