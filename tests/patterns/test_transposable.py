"""transposable_mask: brute force on 4x4, LP on 8x8 tiles, greedy's guarantee, invariants, bad input."""

import itertools
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given
from scipy.optimize import linprog

from nmsparse import conv_from_2d, conv_to_2d, is_transposable, transposable_mask
from nmsparse.patterns.transposable import enumerate_patterns, from_tiles, to_tiles
from conftest import DEVICES, FLOAT_DTYPES


def brute_force_patterns(n, m):
    """Every m x m 0/1 matrix with n ones per row and column, by scanning all 2^(m*m)."""
    out = []
    for bits in range(1 << (m * m)):
        a = np.array([(bits >> k) & 1 for k in range(m * m)]).reshape(m, m)
        if (a.sum(0) == n).all() and (a.sum(1) == n).all():
            out.append(a)
    return np.stack(out)


def lp_optimum(tile, n):
    """Optimal kept sum of one tile from the LP relaxation (integral for bipartite b-matching)."""
    m = tile.shape[0]
    a_eq = []
    for i in range(m):
        r = np.zeros((m, m)); r[i, :] = 1; a_eq.append(r.ravel())
        c = np.zeros((m, m)); c[:, i] = 1; a_eq.append(c.ravel())
    res = linprog(-tile.ravel(), A_eq=np.array(a_eq), b_eq=np.full(2 * m, n), bounds=(0, 1), method="highs")
    assert res.status == 0
    return -res.fun


def kept_sums(w, mask, m):
    return (to_tiles(w.abs().double(), m) * to_tiles(mask, m)).sum((1, 2)).numpy()


def greedy_reference(tile, n):
    """The 2-approximation, sequentially in plain Python (ties to the earlier row-major position)."""
    m = tile.shape[0]
    order = sorted(range(m * m), key=lambda k: (-abs(tile.flat[k]), k))
    rows, cols, keep = [0] * m, [0] * m, np.zeros((m, m), bool)
    for k in order:
        r, c = divmod(k, m)
        if rows[r] < n and cols[c] < n:
            keep[r, c] = True; rows[r] += 1; cols[c] += 1
    return keep


@pytest.mark.parametrize("n", [1, 2, 3])
def test_exact_4x4_against_brute_force(n):
    pats = brute_force_patterns(n, 4)
    assert len(pats) == len(enumerate_patterns(n, 4))
    w = torch.randn(40, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    mask = transposable_mask(w, n, 4)
    assert is_transposable(mask, n, 4)
    tiles = to_tiles(w.abs(), 4).numpy()
    best = np.einsum("tij,kij->tk", tiles, pats).max(1)
    np.testing.assert_allclose(kept_sums(w, mask, 4), best, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7])
def test_exact_8x8_against_lp(n):
    w = torch.randn(32, 40, generator=torch.Generator().manual_seed(10 + n))
    mask = transposable_mask(w, n, 8)
    assert is_transposable(mask, n, 8)
    tiles = to_tiles(w.abs().double(), 8).numpy()
    ref = np.array([lp_optimum(t, n) for t in tiles])
    np.testing.assert_allclose(kept_sums(w, mask, 8), ref, rtol=1e-9)


def test_exact_against_ortools_min_cost_flow():
    ortools = pytest.importorskip("ortools.graph.python.min_cost_flow")
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    n, m = 4, 8
    mask = transposable_mask(w, n, m)
    scale = 1e6
    for tile, ours in zip(to_tiles(w.abs().double(), m).numpy(), kept_sums(w, mask, m)):
        f = ortools.SimpleMinCostFlow()
        s, t = 2 * m, 2 * m + 1
        for i in range(m):
            f.add_arc_with_capacity_and_unit_cost(s, i, n, 0)
            f.add_arc_with_capacity_and_unit_cost(m + i, t, n, 0)
            for j in range(m):
                f.add_arc_with_capacity_and_unit_cost(i, m + j, 1, -int(round(tile[i, j] * scale)))
        f.set_node_supply(s, n * m)
        f.set_node_supply(t, -n * m)
        assert f.solve() == f.OPTIMAL
        assert abs(-f.optimal_cost() / scale - ours) < 1e-4 * m * m


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16)])
def test_greedy_matches_sequential_reference_and_half_bound(n, m):
    w = torch.randn(4 * m, 3 * m, dtype=torch.float64, generator=torch.Generator().manual_seed(m + n))
    mask = transposable_mask(w, n, m, method="greedy")
    assert is_transposable(mask, n, m, exact=False)
    tiles = to_tiles(w, m).numpy()
    ref = np.stack([greedy_reference(t, n) for t in tiles])
    assert np.array_equal(to_tiles(mask, m).numpy(), ref)
    exact = kept_sums(w, transposable_mask(w, n, m), m)
    assert (kept_sums(w, mask, m) >= 0.5 * exact - 1e-12).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_greedy_close_to_exact_on_gaussian(n, m):
    # The benchmark reports this figure on 4096x4096; a smaller matrix gives the same ratio.
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    exact = kept_sums(w, transposable_mask(w, n, m), m).sum()
    greedy = kept_sums(w, transposable_mask(w, n, m, "greedy"), m).sum()
    assert greedy / exact >= 0.95


@st.composite
def cases(draw):
    m = draw(st.sampled_from([1, 2, 4, 8, 16]))
    n = draw(st.integers(0, m))
    rows = m * draw(st.integers(1, 3 if m < 16 else 1))
    cols = m * draw(st.integers(1, 3 if m < 16 else 2))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # many exact ties
        w = torch.randint(-2, 3, (rows, cols), generator=g).to(torch.float64)
    return w.to(dtype), n, m


@given(cases())
def test_invariants(case):
    w, n, m = case
    exact = transposable_mask(w, n, m)
    greedy = transposable_mask(w, n, m, method="greedy")
    for mask in (exact, greedy):
        assert mask.dtype == torch.bool and mask.shape == w.shape
    assert is_transposable(exact, n, m)
    assert is_transposable(greedy, n, m, exact=False)
    # Greedy solves the "at most n" problem, whose optimum can exceed the "exactly n" one, so
    # only the 2-approximation bound relates the two.
    e, g = kept_sums(w, exact, m), kept_sums(w, greedy, m)
    assert (g >= 0.5 * e - 1e-9 * (1 + e)).all()
    if m <= 8:
        ref = np.array([lp_optimum(t, n) if 0 < n < m else (t.sum() if n == m else 0.0)
                        for t in to_tiles(w.abs().double(), m).numpy()])
        np.testing.assert_allclose(e, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nan_and_inf_are_kept(dev, n, m):
    w = torch.randn(2 * m, 2 * m, device=dev)
    w[1, 2], w[m + 3, m + 1], w[0, m] = math.nan, math.inf, -math.inf
    for method in ("exact", "greedy"):
        mask = transposable_mask(w, n, m, method)
        assert mask[1, 2] and mask[m + 3, m + 1] and mask[0, m]
    assert is_transposable(transposable_mask(w, n, m), n, m)


def test_tiles_round_trip():
    w = torch.randn(8, 12)
    assert torch.equal(from_tiles(to_tiles(w, 4), w.shape), w)
    assert torch.equal(to_tiles(w, 4)[1], w[0:4, 4:8])


def test_conv_helpers():
    w = torch.randn(16, 8, 3, 3)
    w2 = conv_to_2d(w)
    assert w2.shape == (16, 72)
    assert torch.equal(w2[5, (1 * 3 + 2) * 8 + 6], w[5, 6, 1, 2])  # (co, kh, kw, ci) order
    assert torch.equal(conv_from_2d(w2, w.shape), w)
    mask = conv_from_2d(transposable_mask(w2, 4, 8), w.shape)
    assert mask.shape == w.shape and is_transposable(conv_to_2d(mask), 4, 8)


@pytest.mark.parametrize(
    "w, kwargs, exc, words",
    [
        (torch.randn(8), dict(n=2, m=4), ValueError, ["w must be 2-D", "(8,)"]),
        (torch.randn(8, 8, 3, 3), dict(n=2, m=4), ValueError, ["2-D", "conv_to_2d"]),
        (torch.randn(6, 8), dict(n=2, m=4), ValueError, ["dim 0", "6", "m=4"]),
        (torch.randn(8, 10), dict(n=2, m=4), ValueError, ["dim 1", "10"]),
        (torch.randn(8, 8), dict(n=5, m=4), ValueError, ["n", "5"]),
        (torch.randn(8, 8), dict(n=2, m=4, method="lp"), ValueError, ["method", "lp"]),
        (torch.ones(8, 8, dtype=torch.int32), dict(n=2, m=4), TypeError, ["w must be a floating", "int32"]),
    ],
)
def test_bad_arguments(w, kwargs, exc, words):
    with pytest.raises(exc) as info:
        transposable_mask(w, **kwargs)
    for word in words:
        assert word in str(info.value)
