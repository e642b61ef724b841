"""`nmsparse bench patterns`: mask computation times, greedy vs exact quality, OR-tools baseline.

Transposable masks come from ``nmsparse.transposable_mask`` (the compiled exact solver for
m >= 4 on the CPU); `nmsparse bench transposable` compares the exact solvers in detail.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..kernels.transposable import transposable_mask  # what users get: the compiled exact solver for m >= 4
from ..patterns import block_mask, nm_mask
from ..patterns.transposable import to_tiles
from ..common.system import machine_info
from ..common.text import markdown_table
from .timing import fmt_time, median_time

TRANSPOSABLE_NM = [(2, 4), (4, 8), (8, 16)]


def _kept(w: torch.Tensor, mask: torch.Tensor) -> float:
    return float((w.abs().double() * mask).sum())


def ortools_baseline(w: torch.Tensor, n: int, m: int, tiles: int, scale: float = 1e6):
    """Solve `tiles` tiles of w with OR-tools' min-cost flow, one graph per tile as the reference
    implementation did with its per-tile integer program. Returns (seconds per tile, kept sums) or None."""
    try:
        from ortools.graph.python import min_cost_flow
    except ImportError:
        return None
    a = to_tiles(w.abs().double(), m)[:tiles].numpy()
    rows = np.repeat(np.arange(m), m)
    cols = m + np.tile(np.arange(m), m)
    src, snk = 2 * m, 2 * m + 1
    tails = np.concatenate([rows, np.full(m, src), np.arange(m, 2 * m)])
    heads = np.concatenate([cols, np.arange(m), np.full(m, snk)])
    caps = np.concatenate([np.ones(m * m, np.int64), np.full(2 * m, n, np.int64)])
    kept = np.empty(len(a))
    t0 = time.perf_counter()
    for k, tile in enumerate(a):
        f = min_cost_flow.SimpleMinCostFlow()
        costs = np.concatenate([-np.rint(tile.ravel() * scale).astype(np.int64), np.zeros(2 * m, np.int64)])
        f.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, costs)
        f.set_node_supply(src, n * m)
        f.set_node_supply(snk, -n * m)
        if f.solve() != f.OPTIMAL:
            raise RuntimeError("OR-tools did not find an optimal flow")
        kept[k] = -f.optimal_cost() / scale
    return (time.perf_counter() - t0) / len(a), kept


def run(sizes=(1024, 4096), baseline_tiles: int = 400, budget_s: float = 5.0, seed: int = 0,
        log=print) -> dict:
    """Time every pattern on Gaussian float32 weights of each size; returns rows and prints tables."""
    g = torch.Generator().manual_seed(seed)
    timing_rows, quality_rows, baseline_rows = [], [], []
    log(f"machine: {machine_info()}")
    for size in sizes:
        w = torch.randn(size, size, generator=g)
        cases = [(f"nm_mask {n}:{m}", lambda n=n, m=m: nm_mask(w, n, m)) for n, m in [(2, 4), (4, 8)]]
        for n, m in TRANSPOSABLE_NM:
            for method in ("exact", "greedy"):
                cases.append((f"transposable {method} {n}:{m}",
                              lambda n=n, m=m, method=method: transposable_mask(w, n, m, method)))
        cases.append(("block_mask 8x8 50% l2", lambda: block_mask(w, (8, 8), 0.5)))
        measured = {}
        for name, fn in cases:
            t, reps = median_time(fn, budget_s=budget_s, max_repeats=11)
            measured[name] = t
            timing_rows.append([f"{size}x{size}", name, fmt_time(t), reps])
            log(f"  {size}x{size} {name}: {fmt_time(t)} (median of {reps})")
        for n, m in TRANSPOSABLE_NM:
            exact = transposable_mask(w, n, m, "exact")
            greedy = transposable_mask(w, n, m, "greedy")
            ke, kg = _kept(w, exact), _kept(w, greedy)
            quality_rows.append([f"{size}x{size}", f"{n}:{m}", f"{kg / ke:.4f}",
                                 f"{float(greedy.double().mean()):.4f}", f"{n / m:.4f}"])
            base = ortools_baseline(w, n, m, baseline_tiles)
            if base is None:
                continue
            per_tile, kept_ref = base
            ours_tiles = to_tiles(w.abs().double() * exact, m).sum((1, 2))[:baseline_tiles].numpy()
            t_ours = measured[f"transposable exact {n}:{m}"]
            n_tiles = (size // m) ** 2
            baseline_rows.append([f"{size}x{size}", f"{n}:{m}", f"{per_tile * 1e3:.3f} ms",
                                  fmt_time(per_tile * n_tiles), fmt_time(t_ours),
                                  f"{per_tile * n_tiles / t_ours:.2g}x",
                                  f"{np.abs(kept_ref - ours_tiles).max():.1e}"])
    tables = {
        "timing": markdown_table(["weight", "operation", "median", "repeats"], timing_rows),
        "quality": markdown_table(["weight", "N:M", "greedy kept sum / exact", "greedy density",
                                   "exact density"], quality_rows),
    }
    if baseline_rows:
        tables["baseline"] = markdown_table(
            ["weight", "N:M", "OR-tools per tile", "OR-tools whole matrix (extrapolated)",
             "nmsparse exact (measured)", "speed-up", f"max |kept sum diff| on {baseline_tiles} tiles"],
            baseline_rows)
    else:
        tables["baseline"] = "OR-tools is not installed (pip install 'nmsparse[bench]'): no baseline."
    return {"machine": machine_info(), "tables": tables}
