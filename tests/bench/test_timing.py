"""`bench step`'s statistics: ratios paired by round, and the median's confidence interval."""

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse.bench.timing import median_ci, paired_ratio, paired_ratios


def test_textbook_ranks():
    # 95% distribution-free intervals for the median (1-indexed ranks): n = 24 -> 7th and 18th, n = 80 -> 31st and 50th
    assert median_ci(range(1, 25)) == (7, 18)
    assert median_ci(range(1, 81)) == (31, 50)
    assert median_ci(range(1, 7)) == (1, 6)  # n = 6: the extremes already cover 1 - 2/64 = 96.9%
    assert median_ci([2.5]) == (2.5, 2.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=120), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_interval_is_the_widest_that_is_needed_and_no_wider(xs, level):
    lo, hi = median_ci(xs, level)
    s = sorted(xs)
    n = len(s)
    assert lo <= sorted(xs)[(n - 1) // 2] and s[n // 2] <= hi  # the sample median lies inside
    k = s.index(lo)  # its lower order statistic, 0-indexed (ties: the first equal one is as good)
    miss = lambda j: 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2**n  # noqa: E731  P(median outside x[j]..x[n-1-j])
    if miss(0) <= 1 - level:
        assert miss(k) <= 1 - level + 1e-12
        nxt = k + 1
        assert nxt >= n // 2 or miss(nxt) > 1 - level or s[nxt] == lo  # one rank narrower would not cover
    else:
        assert (lo, hi) == (s[0], s[-1])  # too few values for the level: the whole range


def test_coverage_on_fresh_samples():
    rng = random.Random(1)
    hits = sum(lo <= 0 <= hi for lo, hi in (median_ci([rng.gauss(0, 1) for _ in range(24)]) for _ in range(2000)))
    assert hits / 2000 >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / 2000)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least one"):
        median_ci([])
    with pytest.raises(ValueError, match="level"):
        median_ci([1.0], level=1.5)


def test_paired_ratio_is_the_median_of_same_round_ratios():
    dense = [1.0, 2.0, 1.0, 1.0, 3.0, 1.0]  # the host slows rounds 2 and 5 for everything
    method = [1.1, 2.2, 1.1, 1.1, 3.3, 1.1]
    assert paired_ratio(method, dense, 1) == pytest.approx(1.1)
    # a burst on the method's own steps alone (rounds 1, 3): outlier rounds, not a shifted ratio
    burst = [2.0, 2.2, 2.0, 1.1, 3.3, 1.1]
    assert paired_ratio(burst, dense, 1) == pytest.approx(1.1)
    assert statistics.median(burst) / statistics.median(dense) == pytest.approx(2.0)  # the ratio of medians moves
    # rounds of 2 steps: per round the block medians (1.5 and 2.0 for round 0), then the median of 3 rounds
    assert paired_ratio([1.0, 2.0, 4.0, 4.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0, 1.0, 1.0], 2) == pytest.approx(1.5)
    assert paired_ratios([1.0, 2.0, 4.0, 4.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0, 1.0, 1.0], 2) == pytest.approx([1.5, 2, 1])
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratio([1.0, 2.0], [1.0], 1)
