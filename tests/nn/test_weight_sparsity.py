"""Weight sparsity parametrizations: SR-STE/STE/fixed N:M, transposable, blocks; state and errors."""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from nmsparse.nn.weight import BlockWeightSparsity, NMWeightSparsity, apply, current_mask
from nmsparse.patterns import block_scores, conv_to_2d, is_transposable, transposable_mask

SETTINGS = settings(deadline=None)  # example count from the profile in conftest.py


def make_layer(kind, seed=0, dtype=torch.float64, ci=8, co=8):
    torch.manual_seed(seed)
    layer = nn.Linear(ci, co) if kind == "linear" else nn.Conv2d(ci, co, 3, padding=1)
    return layer.to(dtype)


def make_input(kind, seed=1, dtype=torch.float64, ci=8):
    g = torch.Generator().manual_seed(seed)
    shape = (5, ci) if kind == "linear" else (2, ci, 5, 5)
    return torch.randn(shape, generator=g, dtype=dtype)


def call(layer, x, w):
    """The layer's product with an explicit weight, bypassing the parametrization."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    return F.conv2d(x, w, layer.bias, padding=layer.padding)


def reference_nm(w, n, m):
    """Independent N:M mask: top-n |w| of m consecutive inputs, on the (Co, kh, kw, Ci) layout."""
    v = w.detach().abs()
    if v.dim() == 4:
        v = v.permute(0, 2, 3, 1)
    groups = v.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    keep = keep.reshape(v.shape)
    return keep.permute(0, 3, 1, 2) if w.dim() == 4 else keep


def view2d(t):
    return t if t.dim() == 2 else conv_to_2d(t)


def original(layer):
    return layer.parametrizations.weight.original


def param(layer):
    return layer.parametrizations.weight[0]


def sgd_steps(layer, x, steps, lr=0.5, **opt):
    """Run a few SGD steps on sum(out**2); yields after each forward+backward, before the update."""
    optim = torch.optim.SGD(layer.parameters(), lr=lr, **opt)
    for _ in range(steps):
        optim.zero_grad()
        layer(x).pow(2).mean().backward()
        yield
        optim.step()


# --- SR-STE / STE gradients and the mask's grouping --------------------------------------------

@SETTINGS
@given(kind=st.sampled_from(["linear", "conv"]), nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (3, 8)]),
       decay=st.sampled_from([0.0, 2e-4, 0.1, 3.0]), seed=st.integers(0, 2**20))
def test_srste_gradient_matches_independent_computation(kind, nm, decay, seed):
    n, m = nm
    layer = make_layer(kind, seed, ci=8 * (m // 4), co=4)
    w = layer.weight.detach().clone()
    apply(layer, NMWeightSparsity(n, m, "srste", decay=decay))
    x = make_input(kind, seed + 1, ci=8 * (m // 4))
    out = layer(x)
    out.pow(2).sum().backward()
    mask = current_mask(layer)
    assert torch.equal(mask, reference_nm(w, n, m))
    # Plain autograd on a detached masked weight, then the SR-STE decay term.
    wm = (w * mask).requires_grad_()
    ref_out = call(layer, x, wm)
    ref_out.pow(2).sum().backward()
    assert torch.equal(out, ref_out)
    expected = wm.grad + decay * (w * ~mask)
    torch.testing.assert_close(original(layer).grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_ste_equals_srste_without_decay(kind):
    x = make_input(kind)
    grads = {}
    for name, p in [("ste", NMWeightSparsity(2, 4, "ste")), ("srste0", NMWeightSparsity(2, 4, "srste", decay=0.0)),
                    ("srste", NMWeightSparsity(2, 4, "srste", decay=0.5))]:
        layer = apply(make_layer(kind), p)
        layer(x).sum().backward()
        grads[name] = original(layer).grad
    assert torch.equal(grads["ste"], grads["srste0"])
    w, mask = original(layer).detach(), current_mask(layer)
    torch.testing.assert_close(grads["srste"], grads["ste"] + 0.5 * w * ~mask)
    assert not torch.equal(grads["srste"], grads["ste"])


def test_conv_groups_run_along_input_channels():
    # A weight whose magnitudes rank by input channel only: the mask must keep the same
    # channels at every (co, kh, kw), which a grouping along kw or a flat reshape would not.
    ci = torch.tensor([1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0], dtype=torch.float64)
    w = ci.view(1, 8, 1, 1) * torch.ones(2, 8, 3, 3, dtype=torch.float64)
    w = w + 0.01 * torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)
    layer = nn.Conv2d(8, 2, 3).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    apply(layer, NMWeightSparsity(2, 4))
    kept = torch.tensor([False, True, True, False, True, False, True, False])
    assert torch.equal(current_mask(layer), kept.view(1, 8, 1, 1).expand(2, 8, 3, 3))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_srste_recomputes_every_training_step_and_eval_uses_current_weights(kind):
    layer = apply(make_layer(kind), NMWeightSparsity(2, 4))
    x = make_input(kind)
    assert int(param(layer).step) == 0  # registration's check forward is not a step
    for _ in sgd_steps(layer, x, 4, lr=2.0):
        assert torch.equal(current_mask(layer), reference_nm(original(layer), 2, 4))
    assert int(param(layer).step) == 4
    # After the last update the stored mask is stale; eval and no_grad use the mask of the current W.
    stale = current_mask(layer)
    assert not torch.equal(stale, reference_nm(original(layer), 2, 4))
    w = original(layer).detach()
    layer.eval()
    assert torch.equal(layer(x), call(layer, x, w * reference_nm(w, 2, 4)))
    layer.train()
    with torch.no_grad():
        layer(x)
    assert current_mask(layer) is stale and int(param(layer).step) == 4


# --- fixed masks ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("transposable", [False, True])
def test_fixed_mask_is_frozen_and_pruned_weights_never_move(kind, transposable):
    layer = make_layer(kind)
    w0 = layer.weight.detach().clone()
    apply(layer, NMWeightSparsity(2, 4, "fixed", transposable=transposable))
    mask = current_mask(layer).clone()
    if transposable:
        assert is_transposable(view2d(mask), 2, 4)
    else:
        assert torch.equal(mask, reference_nm(w0, 2, 4))
    for _ in sgd_steps(layer, make_input(kind), 5, lr=2.0, momentum=0.9):
        assert torch.equal(original(layer).grad[~mask], torch.zeros_like(w0[~mask]))
    assert torch.equal(current_mask(layer), mask)
    assert torch.equal(original(layer)[~mask], w0[~mask])
    assert not torch.equal(original(layer)[mask], w0[mask])
    assert bool((layer.weight[~mask] == 0).all())
    # reset_mask picks again from the weights it is given, then freezes that mask.
    new = param(layer).reset_mask(original(layer))
    if not transposable:
        assert torch.equal(new, reference_nm(original(layer), 2, 4))


# --- transposable ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mask_method", ["exact", "greedy"])
def test_transposable_recomputed_at_multiples_of_recompute_every(kind, mask_method):
    layer = make_layer(kind, ci=4 if kind == "conv" else 8)
    apply(layer, NMWeightSparsity(2, 4, "srste", decay=0.01, transposable=True, mask_method=mask_method,
                                  recompute_every=3))
    x = make_input(kind, ci=4 if kind == "conv" else 8)
    p = param(layer)
    before = current_mask(layer)
    for t, _ in enumerate(sgd_steps(layer, x, 10, lr=2.0)):
        w = original(layer).detach()
        mask = current_mask(layer)
        assert int(p.step) == t + 1
        if t % 3 == 0:
            expected = transposable_mask(view2d(w), 2, 4, mask_method)
            assert torch.equal(view2d(mask), expected)
        else:
            assert torch.equal(mask, before)
        assert is_transposable(view2d(mask), 2, 4, exact=mask_method == "exact")
        assert is_transposable(view2d(mask), 2, 4, exact=False)
        # Straight-through gradient plus decay on the pruned weights.
        wm = (w * mask).requires_grad_()
        call(layer, x, wm).pow(2).mean().backward()
        torch.testing.assert_close(original(layer).grad, wm.grad + 0.01 * w * ~mask)
        if t in (3, 6, 9):
            assert not torch.equal(mask, before)  # the weights moved enough to change it
        before = mask


# --- blocks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_block_oneshot_zeros_stay_zero_through_sgd(kind):
    layer = make_layer(kind, ci=16, co=16, dtype=torch.float32)
    w0 = layer.weight.detach().clone()
    apply(layer, BlockWeightSparsity((8, 8), 0.5))
    mask = current_mask(layer).clone()
    grid = mask[::8, ::8] if kind == "linear" else mask[::8, ::8, 0, 0]
    assert int((~grid).sum()) == 2
    # Whole 8 x 8 (x kernel) blocks: the mask is the grid repeated.
    rep = grid.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(mask, rep if kind == "linear" else rep[:, :, None, None].expand_as(mask))
    # The two lowest-L2 blocks went.
    scores = block_scores(w0, (8, 8), "l2").flatten()
    assert set(torch.nonzero(~grid.flatten()).flatten().tolist()) == set(scores.argsort()[:2].tolist())
    x = make_input(kind, dtype=torch.float32, ci=16)
    for _ in sgd_steps(layer, x, 6, lr=1.0, momentum=0.9, weight_decay=0.1):
        assert bool((layer.weight[~mask] == 0).all())
    assert torch.equal(current_mask(layer), mask)
    assert bool((layer(x) == call(layer, x, original(layer) * mask)).all())
    assert bool((layer.weight[~mask] == 0).all()) and bool((layer.weight[mask] != 0).all())


@pytest.mark.parametrize("power, end, updates", [(3, 12, [2, 5, 8, 11, 12]), (1, 13, [2, 5, 8, 11, 13])])
def test_block_gradual_schedule_hits_targets_and_is_monotone(power, end, updates):
    layer = make_layer("linear", ci=32, co=64, dtype=torch.float32)
    p = BlockWeightSparsity((8, 8), 0.75, "l1", "gradual", start_step=2, end_step=end, every=3, power=power)
    apply(layer, p)
    nblocks = 8 * 4
    assert p.density() == 1.0
    x = make_input("linear", dtype=torch.float32, ci=32)
    prev = current_mask(layer).clone()
    for t, _ in enumerate(sgd_steps(layer, x, 16, lr=0.3)):
        mask = current_mask(layer)
        grid = mask[::8, ::8]
        zeros = int((~grid).sum())
        s = 0.75 * (1 - (1 - min(max((t - 2) / (end - 2), 0), 1)) ** power)
        assert p.target_sparsity(t) == pytest.approx(s)
        assert bool((mask <= prev).all())  # zeroed blocks never return
        if t in updates:
            assert zeros == round(s * nblocks)
            new = prev[::8, ::8] & ~grid
            if new.any():  # the newly zeroed blocks scored lowest among the blocks that were live
                scores = block_scores(original(layer).detach(), (8, 8), "l1")
                assert scores[new].max() <= scores[grid].min()
        else:
            assert torch.equal(mask, prev)
        prev = mask.clone()
    assert int((~prev[::8, ::8]).sum()) == round(0.75 * nblocks)
    assert p.density() == pytest.approx(1 - round(0.75 * nblocks) / nblocks)


# --- step counting, state, copies -----------------------------------------------------------

def test_steps_count_training_forwards_with_autograd_only():
    layer = apply(make_layer("linear"), NMWeightSparsity(2, 4, transposable=True, recompute_every=2))
    p, x = param(layer), make_input("linear")
    assert int(p.step) == 0
    layer(x)
    layer(x)
    assert int(p.step) == 2
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x)
    layer.eval()
    layer(x)
    assert int(p.step) == 2


CONFIGS = {
    "srste": lambda: NMWeightSparsity(2, 4, decay=0.01),
    "fixed": lambda: NMWeightSparsity(2, 4, "fixed"),
    "transposable": lambda: NMWeightSparsity(2, 4, transposable=True, recompute_every=3),
    "block": lambda: BlockWeightSparsity((8, 8), 0.5),
    "gradual": lambda: BlockWeightSparsity((8, 8), 0.5, schedule="gradual", start_step=1, end_step=8, every=2),
}


def build(config, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 16))
    for layer in (net[0], net[3]):
        apply(layer, CONFIGS[config]())
    return net


def train(net, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    record = []
    for _ in range(steps):
        x = torch.randn(4, 8, 4, 4, generator=g)
        opt.zero_grad()
        out = net(x)
        out.pow(2).mean().backward()
        record.append((out.detach(), [q.grad.clone() for q in net.parameters()]))
        opt.step()
    return record


def assert_same(ra, rb):
    for (oa, ga), (ob, gb) in zip(ra, rb):
        assert torch.equal(oa, ob)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_reload_continues_identically(config):
    a = build(config, 0)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5, momentum=0.9)
    train(a, opt_a, 4, seed=1)
    keys = set(a.state_dict())
    assert {"0.parametrizations.weight.original", "0.parametrizations.weight.0.mask",
            "0.parametrizations.weight.0.step"} <= keys
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = build(config, 123)  # different weights, so different masks: all must come from the state
    b.load_state_dict(state["model"])
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.9)
    opt_b.load_state_dict(state["opt"])
    assert torch.equal(current_mask(b[0]), current_mask(a[0]))
    assert_same(train(a, opt_a, 5, seed=2), train(b, opt_b, 5, seed=2))
    assert int(param(b[0]).step) == 9
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_load_into_unregistered_parametrization():
    a = build("transposable", 0)
    train(a, torch.optim.SGD(a.parameters(), lr=0.5), 2, seed=1)
    p = NMWeightSparsity(2, 4, transposable=True, recompute_every=3)
    p.load_state_dict(param(a[3]).state_dict())
    assert torch.equal(p.mask, param(a[3]).mask) and int(p.step) == 2
    w = original(a[3]).detach()
    assert torch.equal(p.eval()(w), w * p.mask)


@pytest.mark.parametrize("config", ["srste", "transposable", "gradual"])
def test_deepcopy_continues_identically(config):
    a = build(config, 0)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5)
    train(a, opt_a, 2, seed=1)
    b = copy.deepcopy(a)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5)
    assert param(b[0]).mask is not param(a[0]).mask
    assert_same(train(a, opt_a, 4, seed=3), train(b, opt_b, 4, seed=3))


# --- reporting, errors ----------------------------------------------------------------------

def test_density_and_pattern_names():
    assert NMWeightSparsity().pattern_name() == "2:4 srste"
    assert NMWeightSparsity(1, 4, "ste").pattern_name() == "1:4 ste"
    assert NMWeightSparsity(4, 8, transposable=True).pattern_name() == "4:8-T exact"
    assert NMWeightSparsity(2, 4, "fixed", transposable=True, mask_method="greedy").pattern_name() == "2:4-T greedy fixed"
    assert BlockWeightSparsity().pattern_name() == "block 8x8 50% l2"
    assert BlockWeightSparsity((4, 8), 0.375, "var").pattern_name() == "block 4x8 37.5% var"
    layer = apply(make_layer("conv", co=16, ci=16), NMWeightSparsity(1, 4))
    assert param(layer).density() == 0.25
    with pytest.raises(RuntimeError, match="no mask yet"):
        NMWeightSparsity().density()


@pytest.mark.parametrize("make, match", [
    (lambda: NMWeightSparsity(5, 4), "n must be <= m"),
    (lambda: NMWeightSparsity(0, 4), "n must be >= 1"),
    (lambda: NMWeightSparsity(2, 0), "m must be >= 1"),
    (lambda: NMWeightSparsity(2, 4, "sr-ste"), "method must be one of .*'sr-ste'"),
    (lambda: NMWeightSparsity(2, 4, decay=-1e-4), "decay must be finite and >= 0"),
    (lambda: NMWeightSparsity(2, 4, decay=float("nan")), "decay must be finite and >= 0, got decay=nan"),
    (lambda: NMWeightSparsity(2, 4, mask_method="optimal"), "mask_method .*'optimal'"),
    (lambda: NMWeightSparsity(2, 4, recompute_every=0), "recompute_every must be >= 1"),
    (lambda: BlockWeightSparsity((8,)), "block must be a pair"),
    (lambda: BlockWeightSparsity(sparsity=1.0), "sparsity must be in"),
    (lambda: BlockWeightSparsity(score="l3"), "score must be one of"),
    (lambda: BlockWeightSparsity(schedule="cubic"), "schedule must be one of .*'cubic'"),
    (lambda: BlockWeightSparsity(schedule="gradual"), "end_step"),
    (lambda: BlockWeightSparsity(start_step=5, end_step=5), "end_step must be >= 6"),
    (lambda: BlockWeightSparsity(start_step=-1), "start_step must be >= 0"),
    (lambda: BlockWeightSparsity(every=0), "every must be >= 1"),
    (lambda: BlockWeightSparsity(power=0), "power must be finite and > 0"),
])
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make, match", [
    (lambda: NMWeightSparsity(2.0, 4), "n must be an int"),
    (lambda: NMWeightSparsity(2, 4, decay="big"), "decay must be a number"),
    (lambda: NMWeightSparsity(2, 4, transposable="yes"), "transposable must be a bool"),
    (lambda: NMWeightSparsity(2, 4, recompute_every=2.5), "recompute_every must be an int"),
])
def test_bad_argument_types(make, match):
    with pytest.raises(TypeError, match=match):
        make()


@pytest.mark.parametrize("p, shape, parts", [
    (NMWeightSparsity(2, 4), (8, 6), ["dim 1 (input features)", "size 6", "m=4"]),
    (NMWeightSparsity(2, 8), (16, 12, 3, 3), ["dim 1 (input channels)", "size 12", "m=8"]),
    (NMWeightSparsity(2, 4, transposable=True), (6, 8), ["dim 0 (output features)", "size 6", "m=4"]),
    (NMWeightSparsity(2, 4, transposable=True), (8, 2, 3, 3), ["kh*kw*Ci", "size 18", "m=4"]),
    (NMWeightSparsity(2, 4, transposable=True), (6, 8, 1, 1), ["dim 0 (output channels)", "size 6"]),
    (BlockWeightSparsity((8, 8)), (16, 12, 3, 3), ["dim 1 (input channels)", "size 12", "block[1]=8"]),
    (BlockWeightSparsity((8, 8)), (12, 16), ["dim 0 (output channels)", "size 12", "block[0]=8"]),
    (NMWeightSparsity(2, 4), (8, 8, 3), ["2-D Linear weight", "(8, 8, 3)"]),
    (BlockWeightSparsity(), (8, 8, 3), ["2-D Linear weight", "(8, 8, 3)"]),
])
def test_check_weight_messages(p, shape, parts):
    with pytest.raises(ValueError) as info:
        p.check_weight(shape, name="layer1.conv1.weight")
    msg = str(info.value)
    assert msg.startswith("layer1.conv1.weight"), msg
    for part in parts:
        assert part in msg, msg


def test_check_weight_accepts_compatible_shapes():
    NMWeightSparsity(2, 4).check_weight((8, 4, 3, 3))
    NMWeightSparsity(2, 4, transposable=True).check_weight((8, 2, 3, 2))  # 2*3*2 = 12 columns
    BlockWeightSparsity((8, 4)).check_weight(torch.Size([16, 4]))


def test_registration_rejects_incompatible_layers():
    with pytest.raises(ValueError, match="dim 1 \\(input channels\\) has size 6"):
        apply(nn.Conv2d(6, 8, 3), NMWeightSparsity(2, 4))
    layer = nn.Linear(6, 8)
    with pytest.raises(ValueError, match="dim 1 \\(input features\\) has size 6"):
        parametrize.register_parametrization(layer, "weight", NMWeightSparsity(2, 4))
    assert not parametrize.is_parametrized(layer)
    with pytest.raises(ValueError, match="no NMWeightSparsity or BlockWeightSparsity"):
        current_mask(nn.Linear(4, 4))
    twice = apply(nn.Linear(8, 8), NMWeightSparsity())
    with pytest.raises(ValueError, match="already has"):
        apply(twice, BlockWeightSparsity((4, 4)))
    with pytest.raises(TypeError, match="parametrization must be"):
        apply(nn.Linear(8, 8), nn.Identity())
