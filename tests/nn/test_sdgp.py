"""SDGP: prune_grad vs a plain reference, conv/linear gradients vs float64, modules, AMP, compile."""

import copy
import io
import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import nmsparse.nn.sdgp as sdgp_mod
from conftest import plain_step_key
from conftest import FLOAT_DTYPES
from nmsparse.nn.sdgp import (SDGP_METHODS, SDGPConv2d, SDGPLinear, prune_grad, sdgp_conv2d,
                              sdgp_linear)

# the methods for any n:m ("tile24" is 2:4 only and has its own tests below)
NM_METHODS = tuple(m for m in SDGP_METHODS if m != "tile24")
# Methods whose kept values are g's own (the unbiased ones scale them: tests/kernels/test_unbiased.py).
MASK_METHODS = ("magnitude", "random", "rescale")
UNBIASED_METHODS = ("random-unbiased", "mvue")

EPS = 1e-4


def plane_dims(ndim, dim):
    """Dims summed for rescale: all but sample (0) and channel, or the channel row if none."""
    d = dim % ndim
    dims = [i for i in range(ndim) if i not in (0, d)]
    return dims or [d]


def ref_prune(g, n, m, method, dim, mask=None):
    """Plain-Python SDGP pruning in float64; `mask` (for random) gives the kept positions."""
    x = g.detach().double()
    d = dim % x.dim()
    groups = x.movedim(d, -1).reshape(-1, m).tolist()
    keeps = mask.movedim(d, -1).reshape(-1, m).tolist() if mask is not None else None
    out = []
    for gi, group in enumerate(groups):
        if keeps is not None:
            kept = {i for i, k in enumerate(keeps[gi]) if k}
        else:
            order = sorted((-(math.inf if math.isnan(v) else abs(v)), i) for i, v in enumerate(group))
            kept = {i for _, i in order[:n]}
        out.append([v if i in kept else 0.0 for i, v in enumerate(group)])
    p = torch.tensor(out, dtype=torch.float64).reshape(x.movedim(d, -1).shape).movedim(-1, d)
    if method == "rescale":
        dims = plane_dims(x.dim(), d)
        full = x.abs().sum(dims, keepdim=True)
        p = p * full / (p.abs().sum(dims, keepdim=True) + EPS)
    return p


def layer_ref_prune(G, n, m, method, dim, rng):
    """What a layer's backward feeds to dX for dY = G drawing from `rng` (an int: a generator seed; a tensor: a
    key), in float64. The unbiased methods' choice comes from prune_grad (their values: tests/kernels/test_unbiased.py)."""
    if method in UNBIASED_METHODS:
        return prune_grad(G, n, m, method, dim, _rng(rng)).double()
    mask = random_mask(G, n, m, dim, rng) if method == "random" else None
    return ref_prune(G, n, m, method, dim, mask)


def _rng(rng):
    return rng if isinstance(rng, torch.Tensor) else torch.Generator().manual_seed(rng)


def group_counts(t, m, dim):
    d = dim % t.dim()
    return (t != 0).movedim(d, -1).reshape(-1, m).sum(-1)


def random_mask(g, n, m, dim, seed):
    """Kept positions of the random method for `seed` (they depend on g's values only where
    g is non-finite), checked to be exactly n per group."""
    out = prune_grad(torch.ones_like(g), n, m, "random", dim, _rng(seed))
    counts = group_counts(out, m, dim)
    assert torch.equal(counts, torch.full_like(counts, n))
    return out != 0


# ----------------------------------------------------------------------------- prune_grad


@st.composite
def grad_cases(draw):
    m = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    n = draw(st.integers(1, m))
    ndim = draw(st.integers(1, 4))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    shape[dim] = m * draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["normal", "ties", "zeros"]))
    if kind == "ties":
        x = torch.randint(-2, 3, shape, generator=g).double()
    elif kind == "zeros":
        x = x * (torch.rand(shape, generator=g) < 0.5)
    return x.to(dtype), n, m, dim


@given(grad_cases(), st.sampled_from(MASK_METHODS))
def test_prune_grad_matches_reference(case, method):
    g, n, m, dim = case
    seed = 123
    out = prune_grad(g, n, m, method, dim, torch.Generator().manual_seed(seed))
    assert out.shape == g.shape and out.dtype == g.dtype and out.stride() == g.stride()
    counts, nonzero = group_counts(out, m, dim), group_counts(g, m, dim)
    if method == "random":
        ref = ref_prune(g, n, m, method, dim, mask=random_mask(g, n, m, dim, seed))
        assert (counts <= n).all() and (counts >= nonzero - (m - n)).all()
    else:
        ref = ref_prune(g, n, m, method, dim)
        # Zeros rank last, so a group keeps min(n, its nonzeros) nonzeros (rescale may underflow).
        assert (counts <= torch.clamp(nonzero, max=n)).all()
    if method == "rescale":
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(g.dtype, 1e-6)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * (1 + ref.abs().max()))
    else:
        assert torch.equal(out.double(), ref)  # kept values are g's, bit for bit
    if method == "magnitude":
        assert torch.equal(counts, torch.clamp(nonzero, max=n))


@given(st.sampled_from([2, 4, 8, 16, 32]), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from(NM_METHODS), st.sampled_from(FLOAT_DTYPES), st.integers(0, 2**31 - 1))
def test_channels_last_equals_nchw(m, h, w, method, dtype, seed):
    n = max(1, m // 4)
    g = torch.randn(2, 2 * m, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)
    cl = g.to(memory_format=torch.channels_last)
    a = prune_grad(g, n, m, method, 1, torch.Generator().manual_seed(seed))
    b = prune_grad(cl, n, m, method, 1, torch.Generator().manual_seed(seed))
    assert a.is_contiguous()
    assert b.is_contiguous(memory_format=torch.channels_last)
    if method == "mvue":  # the same entries kept; a value is a group sum, rounded in the layout's order
        assert torch.equal(a != 0, b != 0)
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,dim", [((3, 8, 4, 5), 1), ((3, 5, 8), -1), ((4, 16), 1), ((8,), 0)])
def test_rescale_keeps_l1_norm(shape, dim):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if len(shape) == 4:
        g[0, 3] = 0.0
        g[1, :4] *= torch.tensor([10.0, 0.001, 0.001, 0.001]).view(4, 1, 1)  # plane 1 all-pruned
    out = prune_grad(g, 1, 4, "rescale", dim)
    dims = plane_dims(g.dim(), dim)
    full, got = g.abs().sum(dims), out.abs().sum(dims)
    kept = (g * (prune_grad(g, 1, 4, "magnitude", dim) != 0)).abs().sum(dims)
    torch.testing.assert_close(got, full * kept / (kept + EPS), rtol=1e-12, atol=0)
    assert (got[kept == 0] == 0).all()
    live = kept > 0
    assert ((got[live] - full[live]).abs() <= full[live] * EPS / kept[live] * 1.01).all()
    if len(shape) == 4:
        assert (kept == 0).any() and live.any()


@given(grad_cases(), st.sampled_from(NM_METHODS), st.integers(0, 2**31 - 1))
def test_nonfinite_survives_pruning(case, method, seed):
    g, n, m, dim = case
    r = torch.Generator().manual_seed(seed)
    special = torch.tensor([math.inf, -math.inf, math.nan], dtype=g.dtype)
    where = torch.rand(g.shape, generator=r) < 0.2
    pick = torch.randint(0, 3, g.shape, generator=r)
    g = torch.where(where, special[pick], g)
    out = prune_grad(g, n, m, method, dim, torch.Generator().manual_seed(seed))
    d = dim % g.dim()
    had = (~torch.isfinite(g)).movedim(d, -1).reshape(-1, m).any(-1)
    has = (~torch.isfinite(out)).movedim(d, -1).reshape(-1, m).any(-1)
    assert (has[had]).all()
    if method != "rescale":  # rescale may spread the overflow over its plane; the others may not
        assert not has[~had].any()


def test_fully_pruned_half_plane_stays_finite():
    g = torch.tensor([100.0, 200.0, 0.0, 0.0], dtype=torch.float16).view(1, 4, 1, 1)
    out = prune_grad(g, 1, 4, "rescale")  # channel 0's plane: 100 / (0 + eps) overflows fp16
    assert torch.isfinite(out).all() and out.flatten().tolist() == [0.0, 200.0, 0.0, 0.0]


def test_prune_grad_bad_input():
    g = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="n must be <= m"):
        prune_grad(g, 5, 4)
    with pytest.raises(ValueError, match="n must be >= 1"):
        prune_grad(g, 0, 4)
    with pytest.raises(TypeError, match="n must be an int"):
        prune_grad(g, 2.0, 4)
    with pytest.raises(ValueError, match=r"dim 1.*\(2, 6, 3, 3\).*m=4"):
        prune_grad(torch.randn(2, 6, 3, 3), 2, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        prune_grad(g, 2, 4, "max")
    with pytest.raises(TypeError, match="g must be a floating tensor"):
        prune_grad(torch.ones(2, 8, dtype=torch.int64), 2, 4)
    with pytest.raises(ValueError, match="dim=4 is out of range"):
        prune_grad(g, 2, 4, dim=4)


# ----------------------------------------------------------------------------- gradients


def key_of(module_seed, step=0):
    """What a CPU layer's backward number `step` draws from: the key of (seed, step), from plain integers."""
    return torch.tensor(plain_step_key(module_seed, step))


@st.composite
def conv_cases(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m))
    cout = m * draw(st.integers(1, 2))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if cout % g == 0]))
    cin = groups * draw(st.integers(1, 2))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # Padding at most the kernel's reach: torch 2.13's CPU conv segfaults on channels_last input
    # 1 wide with a 1-wide kernel, padding 1, stride 2 and dilation 2 (not an SDGP issue).
    reach = [min(2, dl * (kk - 1)) for dl, kk in zip(dilation, k)]
    padding = draw(st.sampled_from(["int", "pair", "valid"] + (["same"] if stride == (1, 1) else [])))
    if padding == "int":
        padding = draw(st.integers(0, min(reach)))
    elif padding == "pair":
        padding = (draw(st.integers(0, reach[0])), draw(st.integers(0, reach[1])))
    size = [dl * (kk - 1) + 1 + draw(st.integers(0, 3)) for dl, kk in zip(dilation, k)]
    return dict(cin=cin, cout=cout, k=k, stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=draw(st.booleans()), n=n, m=m, size=size,
                method=draw(st.sampled_from(NM_METHODS)), seed=draw(st.integers(0, 2**20)))


@given(conv_cases())
def test_conv_gradients_match_float64_reference(c):
    torch.manual_seed(c["seed"])
    conv = SDGPConv2d(c["cin"], c["cout"], c["k"], c["stride"], c["padding"], c["dilation"],
                      c["groups"], c["bias"], n=c["n"], m=c["m"], method=c["method"], seed=c["seed"])
    x0 = torch.randn(2, c["cin"], *c["size"])
    w64 = conv.weight.detach().double().requires_grad_()
    b64 = conv.bias.detach().double().requires_grad_() if c["bias"] else None
    x64 = x0.double().requires_grad_()
    y64 = F.conv2d(x64, w64, b64, c["stride"], c["padding"], c["dilation"], c["groups"])
    G = torch.randn(y64.shape)
    pruned = layer_ref_prune(G, c["n"], c["m"], c["method"], 1, key_of(c["seed"]))
    dx_ref, = torch.autograd.grad(y64, x64, pruned, retain_graph=True)
    dp_ref = torch.autograd.grad(y64, [w64] + ([b64] if c["bias"] else []), G.double())
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        conv.zero_grad()
        conv.sdgp_step.zero_()
        x = x0.clone(memory_format=fmt).requires_grad_()
        y = conv(x)
        with torch.no_grad():  # the same output layout as a plain conv
            assert y.stride() == conv._conv_forward(x, conv.weight, conv.bias).stride()
        y.backward(G.to(memory_format=fmt))
        got = [x.grad] + [p.grad for p in conv.parameters()]
        for a, b in zip(got, [dx_ref, *dp_ref]):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * (1 + b.abs().max()))
        grads.append(got)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@given(st.sampled_from([2, 4, 8, 16, 32]), st.integers(1, 5), st.sampled_from([(5,), (3, 4), (2,), ()]),
       st.booleans(), st.sampled_from(NM_METHODS), st.integers(0, 2**20))
def test_linear_gradients_match_float64_reference(m, fin, lead, bias, method, seed):
    n = max(1, m // 2 - 1)
    torch.manual_seed(seed)
    lin = SDGPLinear(fin, 2 * m, bias, n=n, m=m, method=method, seed=seed)
    x = torch.randn(*lead, fin, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    w64 = lin.weight.detach().double().requires_grad_()
    b64 = lin.bias.detach().double().requires_grad_() if bias else None
    y64 = F.linear(x64, w64, b64)
    G = torch.randn(y64.shape)
    dx_ref, = torch.autograd.grad(y64, x64, layer_ref_prune(G, n, m, method, -1, key_of(seed)), retain_graph=True)
    dp_ref = torch.autograd.grad(y64, [w64] + ([b64] if bias else []), G.double())
    lin(x).backward(G)
    for a, b in zip([x.grad] + [p.grad for p in lin.parameters()], [dx_ref, *dp_ref]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * (1 + b.abs().max()))


def test_functional_forms_match_modules():
    torch.manual_seed(0)
    conv, lin = SDGPConv2d(4, 8, 3, padding="same", method="random"), SDGPLinear(6, 8, method="random")
    x, z = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    conv(x).square().sum().backward()
    lin(z).square().sum().backward()
    x2, z2 = x.detach().requires_grad_(), z.detach().requires_grad_()
    sdgp_conv2d(x2, conv.weight, conv.bias, 1, "same", 1, 1, 2, 4, "random", key_of(0)).square().sum().backward()
    sdgp_linear(z2, lin.weight, lin.bias, 2, 4, "random", key_of(0)).square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(z.grad, z2.grad)


def test_dense_when_n_equals_m_and_padding_modes():
    torch.manual_seed(0)
    for mode in ("zeros", "reflect", "circular"):
        dense = nn.Conv2d(4, 8, 3, padding=1, padding_mode=mode, dtype=torch.float64)
        sd = SDGPConv2d.from_dense(copy.deepcopy(dense), n=4, m=4, method="magnitude")
        assert sd.padding_mode == mode and sd.weight.dtype == torch.float64
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        outs = []
        for mod in (dense, sd):
            xi = x.clone().requires_grad_()
            y = mod(xi)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype))
            outs.append([y, xi.grad, mod.weight.grad, mod.bias.grad])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b)


def test_input_without_grad_skips_the_pruned_product(monkeypatch):
    calls = []
    real = sdgp_mod._prune  # the backward's pruning (prune_grad without the argument checks)
    monkeypatch.setattr(sdgp_mod, "_prune", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv, lin = SDGPConv2d(4, 8, 3), SDGPLinear(4, 8)
    conv(torch.randn(1, 4, 5, 5)).sum().backward()
    lin(torch.randn(2, 4)).sum().backward()
    assert calls == [] and conv.weight.grad is not None and lin.weight.grad is not None
    conv(torch.randn(1, 4, 5, 5, requires_grad=True)).sum().backward()
    assert calls == [1]


# ----------------------------------------------------------------------------- modules


class Net(nn.Module):
    def __init__(self, method="random"):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = SDGPConv2d(8, 8, 3, stride=2, padding=1, bias=False, method=method, seed=1)
        self.c3 = SDGPConv2d.from_dense(nn.Conv2d(8, 16, 1), n=1, m=4, method=method, seed=2)
        self.fc = SDGPLinear(16, 8, method=method, seed=3)

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def train(model, steps, start=0):
    """SGD steps on fixed batches; returns the gradients of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 8, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        history.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return history


def test_random_is_reproducible_from_seed_and_changes_with_step():
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    assert all(torch.equal(p, q) for ga, gb in zip(train(a, 3), train(b, 3)) for p, q in zip(ga, gb))
    assert int(a.c2.sdgp_step) == 3 and int(a.fc.sdgp_step) == 3
    conv = SDGPConv2d(4, 8, 3, method="random", seed=5)
    x, G = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 4, 4)
    grads = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        conv(xi).backward(G)
        grads.append(xi.grad)
    assert not torch.equal(*grads)
    conv.sdgp_step.zero_()
    xi = x.clone().requires_grad_()
    conv(xi).backward(G)
    assert torch.equal(xi.grad, grads[0])


def test_step_counts_forwards_that_record_a_backward():
    lin = SDGPLinear(4, 8)
    x = torch.randn(2, 4)
    with torch.no_grad():
        lin(x)
    assert int(lin.sdgp_step) == 0
    lin(x)
    lin.requires_grad_(False)
    lin(x)
    assert int(lin.sdgp_step) == 1
    lin(x.requires_grad_())
    assert int(lin.sdgp_step) == 2


def test_state_dict_and_deepcopy_continue_identically():
    torch.manual_seed(0)
    a = Net()
    train(a, 2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    b = Net()  # different init: everything must come from the state dict
    b.load_state_dict(torch.load(buf, weights_only=True))
    c = copy.deepcopy(a)
    runs = [train(mod, 2, start=2) for mod in (a, b, c)]
    for other in runs[1:]:
        for ga, gb in zip(runs[0], other):
            assert all(torch.equal(p, q) for p, q in zip(ga, gb))


def test_from_dense_shares_parameters_and_to_dense_round_trips():
    dense = nn.Conv2d(4, 8, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), groups=2, bias=True,
                      dtype=torch.float64)
    sd = SDGPConv2d.from_dense(dense, n=1, m=4, method="magnitude", seed=7)
    assert type(sd) is SDGPConv2d and isinstance(sd, nn.Conv2d)
    assert sd.weight is dense.weight and sd.bias is dense.bias
    assert (sd.n, sd.m, sd.method, sd.seed) == (1, 4, "magnitude", 7)
    assert sd.sdgp_step.dtype == torch.int64 and sd.sdgp_step.device == dense.weight.device
    assert set(sd.state_dict()) == set(dense.state_dict()) | {"sdgp_step"}
    assert "sdgp=1:4 magnitude" in repr(sd)
    back = sd.to_dense()
    assert type(back) is nn.Conv2d and back.weight is dense.weight and back.bias is dense.bias
    assert repr(back) == repr(dense)
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    assert torch.equal(sd(x), dense(x))
    sd.load_state_dict(dense.state_dict())  # a dense checkpoint loads: the step is kept
    lin = nn.Linear(5, 8, bias=False).eval()
    sl = SDGPLinear.from_dense(lin)
    assert sl.weight is lin.weight and sl.bias is None and not sl.training
    assert (sl.n, sl.m, sl.method) == (2, 4, "rescale")
    assert type(sl.to_dense()) is nn.Linear and sl.to_dense().weight is lin.weight


def test_parametrized_weight_is_read_once_per_forward():
    class Halve(nn.Module):
        calls = 0

        def forward(self, w):
            Halve.calls += 1
            return w * 0.5

    lin = SDGPLinear(4, 8, method="magnitude")
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", Halve())
    Halve.calls = 0  # registration evaluates it once
    x = torch.randn(3, 4, requires_grad=True)
    lin(x).sum().backward()
    assert Halve.calls == 1 and int(lin.sdgp_step) == 1
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, 0.5 * torch.ones(8, 3) @ x.detach())
    assert x.grad.shape == x.shape


def test_module_bad_input():
    with pytest.raises(ValueError, match=r"Conv2d with out_channels=6.*m=4"):
        SDGPConv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"Linear with out_features=12.*m=8"):
        SDGPLinear.from_dense(nn.Linear(4, 12), n=2, m=8)
    with pytest.raises(ValueError, match="method must be one of"):
        SDGPLinear(4, 8, method="maxnorm")
    with pytest.raises(ValueError, match="n must be <= m"):
        SDGPConv2d(4, 8, 3, n=5, m=4)
    with pytest.raises(TypeError, match="needs an nn.Conv2d"):
        SDGPConv2d.from_dense(nn.Linear(4, 8))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        SDGPLinear(4, 8)(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"weight's out-channel dim 0.*\(6, 4, 3, 3\).*m=4"):
        sdgp_conv2d(torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3))
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        sdgp_conv2d(torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3), None, 2, "same")


# ----------------------------------------------------------------------------- AMP, compile


@pytest.mark.parametrize("method", NM_METHODS)
def test_grad_scaler_sees_overflow_through_pruning(method):
    torch.manual_seed(0)
    pre = nn.Conv2d(4, 8, 1)
    sd = SDGPConv2d(8, 8, 3, padding=1, n=1, m=8, method=method).requires_grad_(False)
    opt = torch.optim.SGD(pre.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in pre.parameters()]
    G = torch.randn(2, 8, 5, 5)
    G[1, 5, 2, 3] = math.inf  # one overflow, in a group where random keeps only 1 of 8
    loss = (sd(pre(torch.randn(2, 4, 5, 5))) * G).sum()
    scaler.scale(loss).backward()
    assert not torch.isfinite(pre.weight.grad).all()  # it reached the layer below through dX
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(pre.parameters(), before))
    assert scaler.get_scale() < 1024.0


def test_autocast_bfloat16():
    torch.manual_seed(0)
    conv, lin = SDGPConv2d(4, 8, 3, padding=1, method="magnitude"), SDGPLinear(8, 8, method="magnitude")
    dense = nn.Conv2d(4, 8, 3, padding=1)
    dense.load_state_dict(conv.to_dense().state_dict())
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    seen = []
    with torch.autocast("cpu", torch.bfloat16):
        y = conv(x)
        y.register_hook(seen.append)
        out = lin(y.mean((2, 3)))
        yd = dense(x.detach())
    assert y.dtype == out.dtype == yd.dtype == torch.bfloat16
    out.float().square().sum().backward()
    yd.backward(seen[0])
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(conv.weight.grad, dense.weight.grad)
    torch.testing.assert_close(conv.bias.grad, dense.bias.grad)
    dx_ref = torch.nn.grad.conv2d_input(x.shape, conv.weight.detach().bfloat16().double(),
                                        ref_prune(seen[0], 2, 4, "magnitude", 1), padding=1)
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=2e-2, atol=2e-2 * dx_ref.abs().max().item())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(SDGPConv2d(4, 8, 3, padding=1), nn.ReLU(), SDGPConv2d(8, 8, 3, stride=2),
                          nn.Flatten(), SDGPLinear(32, 8, method="magnitude"))
    compiled = torch.compile(copy.deepcopy(model).to(memory_format=torch.channels_last))
    x = torch.randn(2, 4, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().to(memory_format=torch.channels_last).requires_grad_()
    model(xa).square().sum().backward()
    compiled(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert int(compiled._orig_mod[0].sdgp_step) == int(model[0].sdgp_step) == 1


@pytest.mark.slow
def test_torch_compile_random_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    for ga, gb in zip(train(model, 2), train(compiled, 2)):
        for p, q in zip(ga, gb):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --- "tile24": the 2:4 pattern of the fused tensor-core route ---------------------------------

def test_tile24_method_matches_the_reference_and_its_invariants():
    from nmsparse.kernels.reference import tile24_prune_grad
    from nmsparse.nn.sdgp import prune_grad

    g = torch.randn(3, 8, 5, 4, dtype=torch.float64)  # NCHW: positions N*H*W = 60, padded to 64 inside
    out = prune_grad(g, 2, 4, "tile24", dim=1)
    torch.testing.assert_close(out, tile24_prune_grad(g, 1), rtol=0, atol=0)
    keep = (out != 0).movedim(1, -1).reshape(-1, 8)
    assert int(keep.view(-1, 2, 4).sum(-1).max()) <= 2  # <= 2 of every 4 channels at each position
    full = keep[:60 - 60 % 4].view(-1, 4, 2, 4)  # 4 consecutive positions x 4 channels tiles
    assert int(full.sum(1).max()) <= 2  # <= 2 per channel column of a tile: transposable
    assert torch.equal(out[out != 0], g[out != 0])
    with pytest.raises(ValueError, match="'tile24' is the 2:4 tensor-core pattern"):
        prune_grad(g, 1, 4, "tile24", dim=1)
    bad = g.clone()
    bad[0, 3, 1, 1], bad[2, 6, 0, 3] = float("nan"), float("inf")
    kept = prune_grad(bad, 2, 4, "tile24", dim=1)
    assert kept[0, 3, 1, 1].isnan() and kept[2, 6, 0, 3].isinf()


def test_tile24_layers_and_config():
    from nmsparse.nn.config import GradSparsity
    from nmsparse.nn.sdgp import SDGPConv2d, SDGPLinear, prune_grad

    torch.manual_seed(0)
    lin = SDGPLinear(16, 8, method="tile24").double()
    x = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(12, 8, dtype=torch.float64)
    lin(x).backward(gy)
    torch.testing.assert_close(x.grad, prune_grad(gy, 2, 4, "tile24", dim=-1) @ lin.weight.detach())
    conv = SDGPConv2d(4, 8, 3, padding=1, method="tile24").double()
    xc = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    gc = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    conv(xc).backward(gc)
    ref = torch.nn.grad.conv2d_input(xc.shape, conv.weight.detach(), prune_grad(gc, 2, 4, "tile24", dim=1), padding=1)
    torch.testing.assert_close(xc.grad, ref)
    with pytest.raises(ValueError, match="needs n=2, m=4"):
        GradSparsity(4, 8, "tile24")
    with pytest.raises(ValueError, match="needs n=2, m=4"):
        SDGPLinear(16, 8, n=1, m=4, method="tile24")


def test_linear_input_gradient_takes_the_sparse_core_route_when_it_answers(monkeypatch):
    """The dispatcher boundary: a tensor from ops.sdgp_linear_dx is used as is; None means dense."""
    from nmsparse.kernels import ops
    from nmsparse.nn.sdgp import SDGPLinear, prune_grad

    lin = SDGPLinear(16, 8, method="magnitude")
    x = torch.randn(4, 16, requires_grad=True)
    calls = []

    def fake(gy, weight, n, m, method, generator=None):
        calls.append((tuple(gy.shape), tuple(weight.shape), n, m, method))
        return torch.full((4, 16), 7.0)

    monkeypatch.setattr(ops, "sdgp_linear_dx", fake)
    lin(x).sum().backward()
    assert calls == [((4, 8), (8, 16), 2, 4, "magnitude")] and torch.equal(x.grad, torch.full((4, 16), 7.0))
    monkeypatch.setattr(ops, "sdgp_linear_dx", lambda *a, **k: None)
    x.grad = None
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, prune_grad(torch.ones(4, 8), 2, 4, "magnitude", -1) @ lin.weight.detach())


def test_checkpointed_random_layer_draws_the_recomputed_forwards_key():
    """Under activation checkpointing the recomputed forward counts as a forward too; on the CPU the backward draws
    the key that forward saved (step 1 here), a step no other backward uses."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lin = SDGPLinear(8, 16, method="random", seed=5)
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 16)
    checkpoint(lin, x, use_reentrant=False).backward(g)
    assert int(lin.sdgp_step) == 2
    want = prune_grad(g, 2, 4, "random", -1, key_of(5, 1)) @ lin.weight.detach()
    torch.testing.assert_close(x.grad, want)
