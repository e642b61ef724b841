"""Median timing with a time budget; the statistics of timed runs (paired ratios, the median's interval)."""

from __future__ import annotations

import math
import statistics
import time

import torch


def median_time(fn, *, min_repeats: int = 3, max_repeats: int = 15, budget_s: float = 5.0,
                warmup: int = 1) -> tuple[float, int]:
    """Median wall time of fn() in seconds over as many repeats as the budget allows, and the count."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def median_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: order statistics from the binomial(n, 1/2) tails.

    With fewer than 6 values no pair of order statistics reaches 95%: the interval is then (min, max)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail, k, cum = (1 - level) / 2, 0, 0.0
    for j in range(n // 2):  # the median is outside [x[j], x[n-1-j]] with probability 2 P(Bin(n, 1/2) <= j)
        cum += math.comb(n, j) / 2**n
        if cum > tail:
            break
        k = j
    return xs[k], xs[n - 1 - k]


def paired_ratios(times, dense_times, block: int) -> list[float]:
    """Per round (``block`` steps each): the method's block median over dense's block median in the same round."""
    if len(times) != len(dense_times):
        raise ValueError(f"paired ratios need the same rounds: {len(times)} steps against dense's {len(dense_times)}")
    return [statistics.median(times[i:i + block]) / statistics.median(dense_times[i:i + block])
            for i in range(0, len(times), block)]


def paired_ratio(times, dense_times, block: int) -> float:
    """The median over rounds of `paired_ratios`: what `bench step` reports as "x dense (median)"."""
    return statistics.median(paired_ratios(times, dense_times, block))
