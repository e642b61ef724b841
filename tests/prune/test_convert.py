"""prune_trained_model: one call from a trained dense model to a pattern that survives fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import prune_trained_model
from nmsparse.patterns import conv_to_2d


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _steps(model, opt, n=2):
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "4:8-T", "block8x8"])
def test_the_pattern_survives_adamw_steps(pattern):
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # built before: identity kept
    prune_trained_model(model, pattern, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model, opt)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it did train
    with torch.no_grad():
        for w in (model[2].weight, model[6].weight):
            if pattern == "block8x8":
                grid = (w.reshape(w.shape[0] // 8, 8, w.shape[1] // 8, -1) != 0).any(-1).any(1)
                assert grid.float().mean() == 0.5
            elif pattern.endswith("-T"):
                assert nmsparse.is_transposable(conv_to_2d(w) if w.dim() == 4 else w, 4, 8)
            else:
                n, m = map(int, pattern.split(":"))
                assert nmsparse.is_nm(w, n, m, dim=1)
        assert bool((model[8].weight != 0).all())  # the classifier stays dense


def test_without_it_two_steps_break_the_pattern():
    """The failure the call exists for: magnitude pruning alone does not survive an optimizer."""
    model = _net()
    nmsparse.magnitude_prune(model, "2:4")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _steps(model, opt)
    assert not nmsparse.is_nm(model[2].weight.detach(), 2, 4, dim=1)


def test_adaprune_route_and_bad_input():
    model = _net()
    calib = torch.randn(16, 3, 8, 8)
    prune_trained_model(model, "2:4", calib_x=calib, iters=5)
    assert nmsparse.is_nm(model[2].weight.detach(), 2, 4, dim=1)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        prune_trained_model(_net(), "2:4", torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="AdaPrune settings: pass calib_x"):
        prune_trained_model(_net(), "2:4", iters=5)
    with pytest.raises(ValueError, match="unknown pattern"):
        prune_trained_model(_net(), "3:3")
