"""Mask updates once per optimizer step (nn/mask_step.py): the same masks as per-forward steps in a plain loop,
optimizer steps counted under gradient accumulation and activation checkpointing, resumes across modes."""

import copy
import io
import types

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import nmsparse
from nmsparse.nn.weight import BlockWeightSparsity, NMWeightSparsity, apply
from nmsparse.patterns import transposable_mask

CONFIGS = {
    "srste": lambda: NMWeightSparsity(2, 4, decay=0.01),
    "ste": lambda: NMWeightSparsity(2, 4, "ste"),
    "fixed": lambda: NMWeightSparsity(2, 4, "fixed"),
    "transposable": lambda: NMWeightSparsity(2, 4, transposable=True, mask_method="exact", recompute_every=3),
    "block": lambda: BlockWeightSparsity((8, 8), 0.5),
    "gradual": lambda: BlockWeightSparsity((8, 8), 0.5, "l1", "gradual", start_step=1, end_step=8, every=2),
}
CHANGING = ("srste", "ste", "transposable", "gradual")  # their masks must change during the run


def earlier_forward(self, w):
    """_MaskedWeight.forward of the releases that counted training forwards, verbatim."""
    if self.mask.shape != w.shape:
        if self._ready():
            raise ValueError("shape")
        self.check_weight(w.shape)
        self._set(self._view(self._initial(self._view(w))))
        mask = self.mask
    elif self.training and torch.is_grad_enabled():
        if self._due():
            self._set(self._view(self._compute(self._view(w))))
        self.step += 1
        mask = self.mask
    else:
        mask = self.eval_mask(w)
    return self._multiply(w, mask)


def param(layer):
    return layer.parametrizations.weight[0]


def build(config, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 16))
    for layer in (net[0], net[3]):
        apply(layer, CONFIGS[config]())
    return net


def batches(steps, seed=1, micro=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 16, generator=g)) for _ in range(micro)]
            for _ in range(steps)]


def run(net, opt, data, after_step=None):
    """SGD over data (lists of micro-batches); per optimizer step: the masks each forward used, output, gradients."""
    record = []
    for micro in data:
        opt.zero_grad()
        used = []
        for x, y in micro:
            out = net(x)
            used.append([param(net[i]).mask.clone() for i in (0, 3)])
            ((out - y).pow(2).mean() / len(micro)).backward()
        record.append((out.detach(), used, [q.grad.clone() for q in net.parameters()]))
        opt.step()
        if after_step is not None:
            after_step(net)
    return record


def trained(config, way, steps=10, micro=1):
    net = build(config)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    after = None
    if way == "earlier":
        for i in (0, 3):
            param(net[i]).forward = types.MethodType(earlier_forward, param(net[i]))
    elif way == "attach":
        nmsparse.attach(net, opt)
    elif way == "manual":
        nmsparse.attach(net)
        after = nmsparse.step_masks
    elif way == "switch":  # not attached: step_masks switches the layers on its first call
        after = nmsparse.step_masks
    return net, run(net, opt, batches(steps, micro=micro), after)


def assert_same_training(a, b):
    (na, ra), (nb, rb) = a, b
    for (oa, ua, ga), (ob, ub, gb) in zip(ra, rb, strict=True):
        assert torch.equal(oa, ob)
        assert all(torch.equal(x, y) for ma, mb in zip(ua, ub) for x, y in zip(ma, mb))
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    for (ka, ta), (kb, tb) in zip(na.named_parameters(), nb.named_parameters(), strict=True):
        assert ka == kb and torch.equal(ta, tb), ka


@pytest.mark.parametrize("config", list(CONFIGS))
def test_optimizer_steps_give_the_masks_and_weights_of_per_forward_steps(config):
    reference = trained(config, "earlier")
    for way in ("forward", "attach", "manual", "switch"):
        assert_same_training(reference, trained(config, way))
    used = [m[0][1] for _, m, _ in reference[1]]
    if config in CHANGING:
        assert any(not torch.equal(used[0], u) for u in used), "the masks never changed: a vacuous comparison"
    net, _ = trained(config, "attach")
    assert int(param(net[0]).step) == int(param(reference[0][0]).step) == 10


# --- gradient accumulation and activation checkpointing --------------------------------------

@pytest.mark.parametrize("config", ["transposable", "gradual"])
def test_gradient_accumulation_counts_optimizer_steps(config):
    net = build(config)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    nmsparse.attach(net, opt)
    p = param(net[3])
    masks = [p.mask.clone()]
    for k, micro in enumerate(batches(10, micro=4), start=1):
        opt.zero_grad()
        for x, y in micro:
            out = net(x)
            assert torch.equal(p.mask, masks[-1])  # every micro-batch sees the mask of the step
            ((out - y).pow(2).mean() / 4).backward()
        opt.step()
        assert int(p.step) == k
        w, mask = net[3].parametrizations.weight.original.detach(), p.mask.clone()
        if config == "transposable":
            if k % 3 == 0:
                assert torch.equal(mask, transposable_mask(w, 2, 4, "exact"))
            else:
                assert torch.equal(mask, masks[-1])
        else:
            blocks = mask[::8, ::8]
            if k in (1, 3, 5, 7, 8):
                assert int((~blocks).sum()) == round(p.target_sparsity(k) * blocks.numel())
            else:
                assert torch.equal(mask, masks[-1])
        masks.append(mask)
    assert any(not torch.equal(masks[0], m) for m in masks)
    # Not attached, each of the 2 x 4 training forwards per optimizer step counted.
    legacy = build(config)
    run(legacy, torch.optim.SGD(legacy.parameters(), lr=0.5), batches(4, micro=4))
    assert int(param(legacy[3]).step) == 16


class Checkpointed(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return checkpoint(self.net, x, use_reentrant=False)


@pytest.mark.parametrize("config", ["srste", "transposable"])
def test_activation_checkpointing_counts_each_step_once(config):
    plain, _ = trained(config, "attach", steps=7)
    net = build(config)
    wrapped = Checkpointed(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    nmsparse.attach(wrapped, opt)
    for (x, y), in batches(7):
        opt.zero_grad()
        (wrapped(x) - y).pow(2).mean().backward()  # the forward runs again in backward
        opt.step()
    assert int(param(net[0]).step) == 7
    for i in (0, 3):
        assert torch.equal(param(net[i]).mask, param(plain[i]).mask)
    for a, b in zip(net.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    legacy = Checkpointed(build(config))
    opt = torch.optim.SGD(legacy.parameters(), lr=0.5)
    for (x, y), in batches(3):
        opt.zero_grad()
        (legacy(x) - y).pow(2).mean().backward()
        opt.step()
    assert int(param(legacy.net[0]).step) == 6  # not attached: the recomputed forward counted too


# --- state dicts and copies across modes -----------------------------------------------------

@pytest.mark.parametrize("config", ["srste", "transposable", "gradual"])
@pytest.mark.parametrize("saved_by, resumed_by", [("earlier", "attach"), ("forward", "attach"), ("attach", "forward"),
                                                  ("attach", "attach"), ("attach", "attach-after-load")])
def test_state_dicts_resume_exactly_across_modes(config, saved_by, resumed_by):
    data = batches(9)
    whole = build(config)
    opt = torch.optim.SGD(whole.parameters(), lr=0.5, momentum=0.9)
    nmsparse.attach(whole, opt)
    rw = run(whole, opt, data)

    a = build(config)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5, momentum=0.9)
    if saved_by == "earlier":
        for i in (0, 3):
            param(a[i]).forward = types.MethodType(earlier_forward, param(a[i]))
    elif saved_by == "attach":
        nmsparse.attach(a, opt_a)
    run(a, opt_a, data[:3])  # step 3 updates the transposable and gradual masks: saved after (attached) or before
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    b = build(config, seed=5)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.9)
    if resumed_by == "attach":
        nmsparse.attach(b, opt_b)  # before the load, as nmsparse train does
    b.load_state_dict(state["model"])
    opt_b.load_state_dict(state["opt"])
    if resumed_by == "attach-after-load":
        nmsparse.attach(b, opt_b)
    # The same forwards (masks used, outputs, gradients) and weights as the uninterrupted run.
    assert_same_training((whole, rw[3:]), (b, run(b, opt_b, data[3:])))
    assert all(int(param(b[i]).step) == 9 for i in (0, 3))


def test_a_copy_of_an_attached_model_counts_forwards_until_attached():
    a, _ = trained("transposable", "attach", steps=4)  # its optimizer is gone: nothing steps it now
    assert param(a[0]).steps_by == "optimizer" and not param(a[0]).attached
    b = copy.deepcopy(a)
    assert param(b[0]).steps_by == "forward"
    data = batches(5, seed=3)
    rb = run(b, torch.optim.SGD(b.parameters(), lr=0.5), data)
    c = copy.deepcopy(a)
    opt_c = torch.optim.SGD(c.parameters(), lr=0.5)
    nmsparse.attach(c, opt_c)
    assert_same_training((b, rb), (c, run(c, opt_c, data)))
    ra = run(a, opt_a := torch.optim.SGD(a.parameters(), lr=0.5), data, after_step=nmsparse.step_masks)
    assert_same_training((b, rb), (a, ra))
    del opt_a


# --- the API: attach, step_masks ------------------------------------------------------------

def test_attach_and_step_masks_refuse_double_counting_and_wrong_arguments():
    net = build("transposable")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = nmsparse.attach(net, opt)
    with pytest.raises(ValueError, match="attached to an optimizer already"):
        nmsparse.attach(net, opt)
    with pytest.raises(ValueError, match="count every step twice"):
        nmsparse.step_masks(net)
    handle.remove()
    nmsparse.step_masks(net)  # now stepped by hand
    assert int(param(net[0]).step) == 1
    opt.step()
    assert int(param(net[0]).step) == 1  # the hook is gone
    with pytest.raises(ValueError, match="no weight sparsity layer"):
        nmsparse.attach(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="holds none of the model's sparsified weights"):
        nmsparse.attach(build("srste"), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        nmsparse.attach(build("srste"), "sgd")
    sdgp_only = nmsparse.sparsify(nn.Sequential(nn.Conv2d(8, 8, 3)),
                                  nmsparse.SparsityConfig(grad=nmsparse.GradSparsity(2, 4, "rescale")))
    assert nmsparse.attach(sdgp_only, torch.optim.SGD(sdgp_only.parameters(), lr=0.1)) is None


def test_attach_steps_only_the_layers_its_optimizer_trains():
    net = build("transposable")
    opt = torch.optim.SGD(net[3].parameters(), lr=0.5)
    nmsparse.attach(net, opt)
    run(net, opt, batches(2))
    assert param(net[3]).steps_by == "optimizer" and int(param(net[3]).step) == 2
    assert param(net[0]).steps_by == "forward" and int(param(net[0]).step) == 2  # counts its training forwards


def test_step_masks_without_attach_warns_when_forwards_were_counted_as_steps():
    net = build("transposable")
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    run(net, opt, batches(1, micro=3))
    with pytest.warns(UserWarning, match=r"counted several training forwards as steps.*0 \(3\)"):
        nmsparse.step_masks(net)
    assert param(net[0]).steps_by == "optimizer" and int(param(net[0]).step) == 3


def test_a_step_the_scaler_skips_does_not_count_with_a_fused_optimizer():
    """A GradScaler steps a fused optimizer even when it found inf (the kernel skips the update itself, reading
    opt.found_inf); the mask step counts only the steps that updated the weights."""
    net = build("transposable")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    nmsparse.attach(net, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    p = param(net[3])
    for k, ((x, y),) in enumerate(batches(4)):
        opt.zero_grad()
        loss = (net(x) - y).pow(2).mean() * (float("inf") if k == 1 else 1.0)
        scaler.scale(loss).backward()
        before = net[3].parametrizations.weight.original.detach().clone()
        scaler.step(opt)
        scaler.update()
        skipped = torch.equal(before, net[3].parametrizations.weight.original.detach())
        assert skipped == (k == 1)  # the fused kernel left the weights as they were
    assert int(p.step) == 3 and not hasattr(opt, "found_inf")
