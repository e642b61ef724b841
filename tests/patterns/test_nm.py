"""nm_mask: invariants (hypothesis), an independent reference, torch.ao.pruning, bad input."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from torch.ao.pruning import WeightNormSparsifier

import nmsparse
from nmsparse import is_nm, nm_mask
from conftest import DEVICES, FLOAT_DTYPES


def reference_nm_mask(x, n, m, dim):
    """Plain-Python N:M magnitude mask: sort each group by (-|v| with NaN as inf, position)."""
    xm = x.detach().to(torch.float64).movedim(dim, -1)
    flat = xm.reshape(-1, m).tolist()
    out = []
    for group in flat:
        key = [(-(math.inf if math.isnan(v) else abs(v)), i) for i, v in enumerate(group)]
        keep = {i for _, i in sorted(key)[:n]}
        out.append([i in keep for i in range(m)])
    return torch.tensor(out, dtype=torch.bool).reshape(xm.shape).movedim(-1, dim)


@st.composite
def nm_cases(draw):
    m = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    n = draw(st.integers(0, m))
    ndim = draw(st.integers(1, 4))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    shape[dim] = m * draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    values = draw(st.sampled_from(["normal", "few_levels", "special"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if values == "few_levels":  # many exact ties
        x = torch.randint(-2, 3, shape, generator=g).to(torch.float64)
    elif values == "special":
        r = torch.rand(shape, generator=g)
        x = torch.where(r < 0.1, math.nan, x)
        x = torch.where((r >= 0.1) & (r < 0.2), -math.inf, x)
    return x.to(dtype), n, m, dim


@given(nm_cases())
def test_nm_mask_matches_reference_and_invariants(case):
    x, n, m, dim = case
    mask = nm_mask(x, n, m, dim=dim)
    assert mask.dtype == torch.bool and mask.shape == x.shape and mask.device == x.device
    assert is_nm(mask, n, m, dim=dim)
    counts = mask.movedim(dim, -1).reshape(-1, m).sum(-1)
    assert bool((counts == n).all())
    assert torch.equal(mask, reference_nm_mask(x, n, m, dim))


@given(nm_cases())
def test_random_method_is_exact_and_reproducible(case):
    x, n, m, dim = case
    a = nm_mask(x, n, m, dim=dim, method="random", generator=torch.Generator().manual_seed(7))
    b = nm_mask(x, n, m, dim=dim, method="random", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert is_nm(a, n, m, dim=dim)


def test_random_method_is_uniform():
    # Each position of a 2:8 group must be kept with probability 1/4.
    x = torch.randn(20000, 8)
    mask = nm_mask(x, 2, 8, method="random", generator=torch.Generator().manual_seed(0))
    freq = mask.double().mean(0)
    # 20000 draws: std of each frequency is sqrt(p(1-p)/N) ~ 0.003; allow 5 sigma.
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.016), freq
    other = nm_mask(x, 2, 8, method="random", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(mask, other)


def test_nan_and_inf_are_always_kept():
    x = torch.tensor([[0.1, math.nan, 5.0, -math.inf, 2.0, 3.0, 1.0, 0.0]])
    assert nm_mask(x, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    x16 = x.half()
    assert nm_mask(x16, 2, 4).tolist() == nm_mask(x, 2, 4).tolist()


def test_ties_go_to_earlier_position():
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert nm_mask(x, 2, 4).tolist() == [[True, True, False, False], [True, True, False, False]]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_large_tensor_spans_cpu_chunks(dev, dtype):
    # More groups than one CPU chunk, so the chunk boundary is crossed.
    x = torch.randn(1 << 10, 1 << 11, device=dev).to(dtype)
    mask = nm_mask(x, 2, 4)
    ref = reference_nm_mask(x[-3:].cpu(), 2, 4, -1)
    assert torch.equal(mask[-3:].cpu(), ref)
    assert is_nm(mask, 2, 4)


def test_matches_torch_ao_weight_norm_sparsifier():
    for seed in range(3):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 48))
        sp = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        sp.prepare(model, config=[{"tensor_fqn": "0.weight"}])
        sp.step()
        ref = model[0].parametrizations.weight[0].mask.bool()
        w = model[0].parametrizations.weight.original.detach()
        assert torch.equal(nm_mask(w, 2, 4), ref)


def test_non_contiguous_and_channel_dim():
    x = torch.randn(3, 8, 5, 5).to(memory_format=torch.channels_last)
    mask = nm_mask(x, 2, 4, dim=1)
    assert torch.equal(mask, reference_nm_mask(x, 2, 4, 1))
    xt = torch.randn(16, 12).t()
    assert torch.equal(nm_mask(xt, 1, 4), reference_nm_mask(xt.contiguous(), 1, 4, -1))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(n=3, m=2), ValueError, ["n", "3", "m=2"]),
        (dict(n=-1, m=4), ValueError, ["n", "-1"]),
        (dict(n=0, m=0), ValueError, ["m", "0"]),
        (dict(n=2, m=3), ValueError, ["dim -1", "8", "m=3"]),
        (dict(n=2, m=4, dim=2), ValueError, ["dim=2", "(4, 8)"]),
        (dict(n=2.0, m=4), TypeError, ["n"]),
        (dict(n=2, m=4, method="largest"), ValueError, ["method", "largest"]),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        nm_mask(torch.randn(4, 8), **kwargs)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("x", [torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.bool)])
def test_non_float_tensor_is_rejected(x):
    with pytest.raises(TypeError, match=r"x must be a floating tensor.*\(4, 8\)"):
        nm_mask(x, 2, 4)


def test_top_level_exports():
    assert nmsparse.nm_mask is nm_mask
