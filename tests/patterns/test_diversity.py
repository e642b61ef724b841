"""Mask diversity, the transposable count K(m, n), and SAD."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse.patterns import SAD, mask_diversity, sad, transposable_count
from nmsparse.patterns.transposable import enumerate_patterns

SETTINGS = settings(deadline=None)  # example count from the profile in conftest.py


def brute_counts(m):
    """K(m, n) for every n by counting all 2^(m*m) 0/1 matrices."""
    codes = torch.arange(2 ** (m * m))
    bits = (codes[:, None] >> torch.arange(m * m)) & 1
    mats = bits.view(-1, m, m)
    rows, cols = mats.sum(2), mats.sum(1)
    out = {}
    for n in range(m + 1):
        out[n] = int(((rows == n).all(1) & (cols == n).all(1)).sum())
    return out


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_count_matches_brute_force(m):
    for n, k in brute_counts(m).items():
        assert transposable_count(n, m) == k


def test_count_known_values():
    assert transposable_count(2, 4) == 90 == len(enumerate_patterns(2, 4))
    assert transposable_count(1, 4) == 24 == len(enumerate_patterns(1, 4))
    assert transposable_count(3, 4) == 24
    assert transposable_count(1, 2) == 2
    assert transposable_count(1, 3) == 6
    assert transposable_count(4, 8) == 116_963_796_250
    # OEIS A001499 (two per row and column) and A001501 (three)
    assert [transposable_count(2, m) for m in range(2, 8)] == [1, 6, 90, 2040, 67950, 3110940]
    assert [transposable_count(3, m) for m in range(3, 8)] == [1, 24, 2040, 297200, 68938800]
    assert [transposable_count(0, m) for m in (1, 5)] == [1, 1]
    assert isinstance(transposable_count(4, 8), int)


@pytest.mark.parametrize("m", range(1, 11))
def test_count_identities(m):
    assert transposable_count(1, m) == math.factorial(m)
    for n in range(m + 1):
        assert transposable_count(n, m) == transposable_count(m - n, m)


def test_count_reaches_its_documented_range():
    assert transposable_count(6, 12) > 0
    assert transposable_count(2, 100) > 0
    with pytest.raises(ValueError, match=r"n=8, m=16.*DP states"):
        transposable_count(8, 16)
    with pytest.raises(ValueError, match="n must be <= m"):
        transposable_count(5, 4)
    with pytest.raises(TypeError, match="int"):
        transposable_count(2.0, 4)


@pytest.mark.parametrize("pattern,kwargs,value", [
    ("unstructured", {"density": 0.5}, 0.693),
    ("nm", {"n": 4, "m": 8}, 0.531),
    ("nm", {"n": 2, "m": 4}, 0.448),
    ("transposable", {"n": 4, "m": 8}, 0.398),
    ("transposable", {"n": 2, "m": 4}, 0.281),
    ("4:8", {}, 0.531),
    ("2:4", {}, 0.448),
    ("4:8-T", {}, 0.398),
    ("2:4-t", {}, 0.281),
])
def test_spec_values(pattern, kwargs, value):
    assert round(mask_diversity(pattern, **kwargs), 3) == value


def test_formulas():
    assert mask_diversity("nm", n=1, m=4) == pytest.approx(math.log(4) / 4)
    assert mask_diversity("transposable", n=1, m=4) == pytest.approx(math.log(24) / 16)
    assert mask_diversity("block", density=0.5, block=64) == pytest.approx(math.log(2) / 64)
    assert mask_diversity("block", density=0.5, block=(8, 8)) == mask_diversity("block", density=0.5, block=64)
    assert mask_diversity("unstructured", density=0.25) == pytest.approx(
        -0.25 * math.log(0.25) - 0.75 * math.log(0.75))
    assert mask_diversity("unstructured", density=0.0) == 0.0 == mask_diversity("unstructured", density=1)
    # exact finite values
    assert mask_diversity("unstructured", density=0.5, numel=10) == pytest.approx(math.log(252) / 10)
    assert mask_diversity("unstructured", density=0.3, numel=10) == pytest.approx(math.log(120) / 10)
    assert mask_diversity("block", density=0.5, block=16, numel=64) == pytest.approx(math.log(6) / 64)
    assert mask_diversity("nm", n=2, m=4, numel=16) == mask_diversity("2:4")
    assert mask_diversity("4:8-T", numel=128) == mask_diversity("transposable", n=4, m=8)
    assert mask_diversity("2:4", density=0.5) == mask_diversity("2:4")


def test_ordering_at_half_density():
    vals = [mask_diversity("unstructured", density=0.5), mask_diversity("4:8"), mask_diversity("2:4"),
            mask_diversity("4:8-T"), mask_diversity("2:4-T"), mask_diversity("block", density=0.5, block=64)]
    assert vals == sorted(vals, reverse=True)


@SETTINGS
@given(st.floats(0.01, 0.99), st.sampled_from([1, 4, 64]))
def test_finite_numel_converges_to_the_limit(density, block):
    pattern = "unstructured" if block == 1 else "block"
    kw = {"block": block} if block > 1 else {}
    limit = mask_diversity(pattern, density=density, **kw)
    errors = []
    for blocks in (10**3, 10**5, 10**7):
        finite = mask_diversity(pattern, density=density, numel=blocks * block, **kw)
        errors.append(abs(finite - limit))
    assert errors[-1] < 1e-5 / block and errors[-1] <= errors[0]


@SETTINGS
@given(st.integers(1, 400), st.floats(0.0, 1.0))
def test_finite_unstructured_is_an_exact_log_binomial(numel, density):
    value = mask_diversity("unstructured", density=density, numel=numel)
    kept = round(density * numel)
    assert value == pytest.approx(math.log(math.comb(numel, kept)) / numel, abs=1e-12)
    assert value <= mask_diversity("unstructured", density=kept / numel) + 1e-12  # log C(T, k) <= T H(k/T)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    (("dense",), {}, ValueError, r"'unstructured', 'nm', 'transposable', 'block'"),
    (("unstructured",), {}, ValueError, "density"),
    (("unstructured",), {"density": 1.5}, ValueError, "density"),
    (("unstructured",), {"density": "half"}, TypeError, "density"),
    (("block",), {"density": 0.5}, ValueError, "block"),
    (("block",), {"density": 0.5, "block": 0}, ValueError, "block"),
    (("block",), {"density": 0.5, "block": 64, "numel": 100}, ValueError, "multiple of 64"),
    (("nm",), {"n": 2}, ValueError, "n and m"),
    (("nm",), {"n": 2, "m": 4, "numel": 6}, ValueError, "multiple of 4"),
    (("transposable",), {"n": 2, "m": 4, "numel": 24}, ValueError, "multiple of 16"),
    (("2:4",), {"density": 0.25}, ValueError, "conflicts"),
    (("2:4",), {"m": 8}, ValueError, "conflicts"),
    (("5:4",), {}, ValueError, "n must be <= m"),
    (("unstructured",), {"density": 0.5, "numel": 0}, ValueError, "numel"),
    ((None,), {}, TypeError, "pattern"),
])
def test_diversity_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mask_diversity(*args, **kwargs)


masks = st.integers(0, 2**31 - 1).flatmap(
    lambda seed: st.tuples(st.just(seed), st.lists(st.integers(1, 6), min_size=1, max_size=3)))


@SETTINGS
@given(masks, st.sampled_from([torch.bool, torch.float32, torch.int64]))
def test_sad_matches_a_manual_count(seed_shape, dtype):
    seed, shape = seed_shape
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(shape, generator=g) < 0.5) * torch.randint(1, 4, shape, generator=g)
    b = (torch.rand(shape, generator=g) < 0.5) * -torch.rand(shape, generator=g)
    a, b = a.to(dtype), b.to(dtype) if dtype is not torch.int64 else (b != 0).to(dtype)
    flat_a, flat_b = a.flatten().tolist(), b.flatten().tolist()
    manual = sum((x != 0) != (y != 0) for x, y in zip(flat_a, flat_b))
    result = sad(a, b)
    assert isinstance(result, SAD) and isinstance(result.count, int)
    assert result == (manual, manual / len(flat_a))
    assert sad(a, a) == (0, 0.0)
    assert sad(a, a == 0) == (len(flat_a), 1.0)


def test_sad_dict_sums_and_errors():
    a = {"x": torch.tensor([True, False, True, True]), "y": torch.zeros(2, 3)}
    b = {"y": torch.ones(2, 3), "x": torch.tensor([True, True, True, False])}
    assert sad(a, b) == SAD(8, 0.8)
    assert sad({}, {}) == SAD(0, 0.0)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        sad(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\['y'\].*\(2, 3\).*\(6,\)"):
        sad(a, {"x": b["x"], "y": torch.ones(6)})
    with pytest.raises(ValueError, match="keys.*z"):
        sad(a, {**b, "z": torch.ones(1)})
    with pytest.raises(TypeError, match="dicts"):
        sad(a, torch.ones(4))
