"""Median timing with a time budget."""

from __future__ import annotations

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
