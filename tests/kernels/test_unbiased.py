"""Unbiased gradient pruning ("mvue", "random-unbiased"): a plain float64 reference, unbiasedness,
variance, exactly n kept, non-finite entries, reproducibility, the SDGP layers' expected dX."""

import copy
import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from conftest import FLOAT_DTYPES, plain_uniforms
from nmsparse import GradSparsity
from nmsparse.kernels.unbiased import (mvue_grouped, mvue_probabilities, mvue_variance,
                                       random_unbiased_variance)
from nmsparse.nn.sdgp import SDGPConv2d, SDGPLinear, prune_grad

UNBIASED = ("random-unbiased", "mvue")
NM = [(1, 2), (2, 4), (4, 8), (2, 8)]


def ref_mvue_group(group, n, u):
    """Plain-Python MVUE of one group for the uniform u (float64): water-filling, systematic sampling."""
    m = len(group)
    finite = [math.isfinite(v) for v in group]
    a = [abs(v) if f else 0.0 for v, f in zip(group, finite)]
    if n >= m or sum(x > 0 for x in a) <= n:
        return list(group)
    order = sorted(range(m), key=lambda i: (-a[i], i))
    for j in range(n):
        if (n - j) * a[order[j]] <= sum(a[order[k]] for k in range(j, m)):
            break
    capped, r = set(order[:j]), n - j
    s = sum(a[i] for i in range(m) if i not in capped)
    out, cum = [], 0.0
    for i, v in enumerate(group):
        if not finite[i] or i in capped:
            out.append(v)
            continue
        lo, cum = cum, cum + r * a[i] / s
        hit = a[i] > 0 and any(lo <= u + k < cum for k in range(r))
        out.append(math.copysign(s / r, v) if hit else 0.0)
    return out


def uniforms(groups, seed):
    """The uniforms "mvue" draws on the CPU from a generator seeded with `seed`: one per group, channels-last
    order, hashed from one word of the generator (kernels.draws; conftest.plain_uniforms)."""
    return torch.tensor(plain_uniforms(groups, seed), dtype=torch.float32)


@st.composite
def cases(draw):
    m = draw(st.sampled_from([2, 4, 8, 16]))
    n = draw(st.integers(1, m))
    ndim = draw(st.integers(1, 4))
    dim = draw(st.integers(0, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = m * draw(st.integers(1, 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    kind = draw(st.sampled_from(["normal", "ties", "zeros", "dominant"]))
    if kind == "ties":
        x = torch.randint(-2, 3, shape, generator=gen).double()
    elif kind == "zeros":
        x = x * (torch.rand(shape, generator=gen) < 0.5)
    elif kind == "dominant":
        x.view(-1)[0] = 1e4
    return x.to(draw(st.sampled_from(FLOAT_DTYPES))), n, m, dim


@given(cases(), st.integers(0, 2**31 - 1))
def test_mvue_matches_the_plain_reference_and_keeps_n(case, seed):
    g, n, m, dim = case
    out = prune_grad(g, n, m, "mvue", dim, torch.Generator().manual_seed(seed))
    assert out.shape == g.shape and out.dtype == g.dtype and out.stride() == g.stride()
    groups = g.movedim(dim, -1).reshape(-1, m).double()
    u = uniforms(groups.shape[0], seed).double().tolist()
    ref = torch.tensor([ref_mvue_group(grp, n, uk) for grp, uk in zip(groups.tolist(), u)], dtype=torch.float64)
    got = out.movedim(dim, -1).reshape(-1, m).double()
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}.get(g.dtype, 1e-12)
    torch.testing.assert_close(got, ref.to(g.dtype).double(), rtol=tol, atol=0)
    kept, nonzero = (got != 0).sum(1), (groups != 0).sum(1)
    assert torch.equal(kept, nonzero.clamp(max=n))  # exactly n, or every nonzero where fewer


@given(cases(), st.sampled_from(UNBIASED), st.integers(0, 2**31 - 1))
def test_random_unbiased_is_random_times_m_over_n(case, method, seed):
    g, n, m, dim = case
    gen = torch.Generator().manual_seed(seed)
    out = prune_grad(g, n, m, "random-unbiased", dim, gen)
    rnd = prune_grad(g, n, m, "random", dim, torch.Generator().manual_seed(seed))
    assert torch.equal(out, rnd * (m / n) if n < m else g)


# Groups of the Monte Carlo tests: random, ties, zeros (fewer than n nonzeros, and more), one dominant entry.
def mc_groups(m):
    gen = torch.Generator().manual_seed(m)
    rows = [torch.randn(m, generator=gen, dtype=torch.float64), torch.ones(m, dtype=torch.float64),
            torch.tensor([1.0, -1.0] * (m // 2), dtype=torch.float64)]
    z = torch.randn(m, generator=gen, dtype=torch.float64)
    z[::2] = 0
    rows.append(z)
    one = torch.zeros(m, dtype=torch.float64)
    one[-1] = -3.0
    rows.append(one)
    dom = torch.randn(m, generator=gen, dtype=torch.float64) * 1e-3
    dom[1] = 50.0
    rows.append(dom)
    return torch.stack(rows)


@pytest.mark.slow
@pytest.mark.parametrize("n,m", NM)
def test_mvue_exact_mean_and_variance_over_u(n, m):
    """E over u of the systematic design, on a fine midpoint grid (the output is piecewise constant
    in u with at most m steps, so the grid mean is exact to m * max|out| / N): the mean is g, the
    variance is the closed form sum g^2 (1 - p) / p, and not above random-unbiased's."""
    groups = mc_groups(m)
    N = 20000
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    for grp in groups:
        out = mvue_grouped(grp.expand(N, m).contiguous(), n, u)
        assert ((out != 0).sum(1) == min(n, int((grp != 0).sum()))).all()
        bound = 2 * m * out.abs().max() / N
        assert (out.mean(0) - grp).abs().max() <= bound
        var = ((out - grp) ** 2).mean(0).sum()
        closed = mvue_variance(grp[None], n, m)
        assert abs(var - closed) <= 2 * m * out.abs().max() ** 2 / N + 1e-12
        assert closed <= random_unbiased_variance(grp[None], n, m) + 1e-12
    p = mvue_probabilities(groups, n, m)
    assert torch.allclose(p.sum(1), torch.tensor([min(n, int((r != 0).sum())) for r in groups], dtype=torch.float64))
    assert (p <= 1).all() and (p >= 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", UNBIASED)
@pytest.mark.parametrize("n,m", NM)
def test_unbiased_by_monte_carlo(method, n, m):
    """Mean of K draws from the generator within 5 standard errors of g, entry by entry; the
    standard error sqrt(Var_i / K) from the closed-form per-entry variance g_i^2 (1 - p_i) / p_i
    (p_i = n / m for random-unbiased). A false alarm has probability below 1e-5 per entry."""
    groups = mc_groups(m)
    K = 20000
    out = prune_grad(groups.repeat(K, 1), n, m, method, 1, torch.Generator().manual_seed(7)).view(K, -1, m)
    if method == "mvue":
        p = mvue_probabilities(groups, n, m)
    else:
        p = torch.full_like(groups, n / m)
    var_i = torch.where(p > 0, groups**2 * (1 - p) / p.clamp(min=1e-300), 0)
    se = (var_i / K).sqrt()
    assert ((out.mean(0) - groups).abs() <= 5 * se + 1e-12).all()
    # The sample variance agrees with the closed form within 10% (several standard errors at this K)
    # where every nonzero entry has p >= 0.05; the dominant-entry group's rare draws (p ~ 1e-5)
    # make its sample variance heavy-tailed: its variance is checked exactly over u above.
    emp = out.var(0).sum(1)
    tame = torch.where(groups != 0, p, 1).amin(1) >= 0.05
    assert torch.allclose(emp[tame], var_i.sum(1)[tame], rtol=0.1, atol=1e-9)


def test_mvue_variance_is_least_on_random_groups():
    gen = torch.Generator().manual_seed(0)
    for n, m in NM:
        g = torch.randn(200, m, generator=gen, dtype=torch.float64) * torch.rand(200, 1, generator=gen)
        mv = torch.stack([mvue_variance(r[None], n, m) for r in g])
        ru = torch.stack([random_unbiased_variance(r[None], n, m) for r in g])
        assert (mv <= ru + 1e-12).all()


def test_mvue_one_two_is_the_papers():
    g = torch.tensor([[1.0, -3.0]], dtype=torch.float64)
    u = torch.tensor([0.1, 0.3, 0.26], dtype=torch.float64)
    out = mvue_grouped(g.expand(3, 2).contiguous(), 1, u)
    # keep 1.0 with probability 1/4 as +4, else -3.0 as -4
    assert out.tolist() == [[4.0, 0.0], [0.0, -4.0], [0.0, -4.0]]


@pytest.mark.parametrize("method", UNBIASED)
def test_nonfinite_kept_identity_and_reproducible(method):
    g = torch.tensor([[float("nan"), 1.0, 2.0, 3.0], [float("inf"), -float("inf"), 0.5, 0.1],
                      [1.0, 2.0, 3.0, 4.0]])
    out = prune_grad(g, 2, 4, method, 1, torch.Generator().manual_seed(3))
    assert torch.isnan(out[0, 0]) and out[1, 0] == float("inf") and out[1, 1] == -float("inf")
    assert torch.isfinite(out[2]).all()
    x = torch.randn(4, 8, 3, 3)
    assert torch.equal(prune_grad(x, 8, 8, method, 1, torch.Generator()), x)  # n == m: identity
    a = prune_grad(x, 2, 8, method, 1, torch.Generator().manual_seed(5))
    b = prune_grad(x, 2, 8, method, 1, torch.Generator().manual_seed(5))
    c = prune_grad(x, 2, 8, method, 1, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    cl = prune_grad(x.to(memory_format=torch.channels_last), 2, 8, method, 1, torch.Generator().manual_seed(5))
    assert torch.equal(cl, a)  # groups follow the logical channel dim


@pytest.mark.slow
@pytest.mark.parametrize("method", UNBIASED)
def test_layers_expected_input_gradient_is_dense(method):
    """One sample repeated K times: each copy's dY groups draw their own choice, so the mean of
    the K rows of dX estimates E[dX]; it equals the dense dX within 5 standard errors."""
    torch.manual_seed(0)
    K = 4000
    lin = SDGPLinear(6, 8, n=2, m=4, method=method, seed=1).double()
    conv = SDGPConv2d(3, 8, 3, padding=1, n=1, m=4, method=method, seed=2).double()
    for layer, x1 in ((lin, torch.randn(1, 6, dtype=torch.float64)),
                      (conv, torch.randn(1, 3, 4, 4, dtype=torch.float64))):
        x = x1.expand(K, *x1.shape[1:]).clone().requires_grad_()
        y = layer(x)
        G = torch.randn(y.shape[1:], dtype=torch.float64).expand_as(y).contiguous()
        y.backward(G)
        dense = x1.clone().requires_grad_()
        fwd = F.linear if layer is lin else (lambda t, w, b: F.conv2d(t, w, b, padding=1))
        dx_dense, = torch.autograd.grad(fwd(dense, layer.weight, layer.bias), dense, G[:1])
        mean, se = x.grad.mean(0), x.grad.std(0) / math.sqrt(K)
        assert ((mean - dx_dense[0]).abs() <= 5 * se + 1e-9).all()
        # and the weight gradient stays the dense one
        w_dense, = torch.autograd.grad(fwd(x1.expand_as(x), layer.weight, layer.bias), layer.weight, G)
        torch.testing.assert_close(layer.weight.grad, w_dense)


@pytest.mark.parametrize("method", UNBIASED)
def test_ranks_with_the_same_seed_and_step_choose_alike(method):
    """DDP ranks hold copies of a layer with one seed and step count: the same dY gives the same
    choice on each (the generator comes from (seed, step), never from the rank)."""
    a = SDGPConv2d(4, 8, 3, method=method, n=2, m=4, seed=11)
    b = copy.deepcopy(a)
    x, G = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 4, 4)
    grads = []
    for layer in (a, b, a):
        xi = x.clone().requires_grad_()
        layer(xi).backward(G)
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])  # step 2 draws anew


def test_bad_method_names_suggest():
    g = torch.randn(2, 4)
    with pytest.raises(ValueError, match="did you mean 'mvue'"):
        prune_grad(g, 2, 4, "mvu", 1)
    with pytest.raises(ValueError, match="did you mean 'random-unbiased'"):
        GradSparsity(2, 4, "random_unbiased")
    with pytest.raises(ValueError, match="did you mean 'mvue'"):
        SDGPLinear(4, 4, method="mvve")
