"""Median timing with a time budget, and a one-line description of the machine."""

from __future__ import annotations

import os
import platform
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """CPU, core count, torch version with the threads it uses now, Python version (one line)."""
    n = torch.get_num_threads()
    return (f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({n} thread{'' if n == 1 else 's'}), Python {platform.python_version()}")


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
