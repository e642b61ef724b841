"""`nmsparse bench transposable`: the exact transposable N:M solvers on one float32 matrix.

Times, on Gaussian float32 weights (4096 x 4096 by default), in one run: the compiled solver
(``kernels.transposable.transposable_exact_native``) with 1 and 2 threads, taking turns run by
run; the PyTorch exact solver (``patterns.transposable_mask``, 1 thread); and OR-tools' min-cost
flow, one graph per tile (``bench.patterns.ortools_baseline``, integer costs |w| x 1e9, one
thread). Compiled times are medians of ``repeats`` runs, as wall time and as the process's CPU
time (a loaded machine stretches the first far more). The PyTorch solver runs once: on the whole
matrix when a band of 1024 rows predicts at most ``budget_s``, else on that band, scaled to all
rows. OR-tools solves the first ``ortools_tiles`` tiles, extrapolated to all. The tables say
which numbers are extrapolated. Every solver's kept sums of |w| are compared with the compiled
solver's on the same tiles.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from ..common.system import machine_info
from ..common.text import markdown_table
from ..kernels.transposable import native_available, native_error, transposable_exact_native
from ..patterns import transposable_mask as torch_transposable_mask
from ..patterns.transposable import to_tiles
from .patterns import ortools_baseline
from .timing import fmt_time

NM = [(4, 8), (8, 16), (16, 32)]
TARGET_1_THREAD_S = {(4, 8): 0.5, (8, 16): 2.0}  # issue #12
TARGET_VS_ORTOOLS = 3.0


def _load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def _timed(fn, repeats: int, threads=(1, 2)) -> dict:
    """{threads: (median wall s, median CPU s)} of fn(), the thread counts taking turns run by run
    (after one warm-up run each), so that a change in the machine's load hits them alike."""
    old = torch.get_num_threads()
    wall = {t: [] for t in threads}
    cpu = {t: [] for t in threads}
    try:
        for k in range(repeats + 1):
            for t in threads:
                torch.set_num_threads(t)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if k:
                    wall[t].append(time.perf_counter() - t0)
                    cpu[t].append(time.process_time() - c0)
    finally:
        torch.set_num_threads(old)
    return {t: (statistics.median(wall[t]), statistics.median(cpu[t])) for t in threads}


def _kept(w: torch.Tensor, mask: torch.Tensor, m: int) -> np.ndarray:
    return (to_tiles(w.abs().double(), m) * to_tiles(mask, m)).sum((1, 2)).numpy()


def bench_nm(w: torch.Tensor, n: int, m: int, repeats: int = 5, budget_s: float = 60.0,
             ortools_tiles: int = 2000, log=print) -> dict:
    """One N:M: the measurements of every solver on w (a dict of plain numbers and flags)."""
    size = w.shape[0]
    res = {"n": n, "m": m, "size": size}
    for threads, t in _timed(lambda: transposable_exact_native(w, n, m), repeats).items():
        res[f"native_{threads}"] = t
        log(f"  {n}:{m} compiled, {threads} thread(s): {fmt_time(t[0])} wall, {fmt_time(t[1])} CPU  ({_load()})")
    mask = transposable_exact_native(w, n, m)
    # PyTorch solver, 1 thread: first on a band of tile rows; the whole matrix when that predicts
    # at most budget_s, else the band's time scaled to all rows (the tables say so; it is batched
    # over tiles, so the scaling overestimates: a 512-row band by 10-20% at 4:8 on the 2-core machine).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        band = min(size, m * max(1, 1024 // m))
        t0 = time.perf_counter()
        ref = torch_transposable_mask(w[:band], n, m)
        t_band = time.perf_counter() - t0
        rows, times = band, [t_band]
        if band < size and t_band * size / band <= budget_s:
            t0 = time.perf_counter()
            ref = torch_transposable_mask(w, n, m)
            rows, times = size, [time.perf_counter() - t0]
    finally:
        torch.set_num_threads(old)
    res["torch"], res["torch_rows"] = times[0] * size / rows, rows
    res["torch_diff"] = float(np.abs(_kept(w[:rows], ref, m) - _kept(w[:rows], mask[:rows], m)).max())
    log(f"  {n}:{m} PyTorch exact, 1 thread: {fmt_time(res['torch'])}"
        f"{'' if rows == size else f' (extrapolated from {rows} rows)'}")
    # OR-tools on the first tiles, extrapolated to all
    base = ortools_baseline(w, n, m, ortools_tiles, scale=1e9)
    if base is not None:
        per_tile, kept_ref = base
        n_tiles = (size // m) ** 2
        res["ortools"] = per_tile * n_tiles
        res["ortools_tiles"] = min(ortools_tiles, n_tiles)
        res["ortools_diff"] = float(np.abs(kept_ref - _kept(w, mask, m)[:len(kept_ref)]).max())
        log(f"  {n}:{m} OR-tools: {per_tile * 1e3:.3f} ms per tile, {fmt_time(res['ortools'])} for the matrix "
            f"(extrapolated from {res['ortools_tiles']} tiles)")
    return res


def _row(r: dict) -> list[str]:
    (w1, c1), (w2, c2) = r["native_1"], r["native_2"]
    torch_note = "" if r["torch_rows"] == r["size"] else f" (extrapolated from {r['torch_rows']} rows)"
    orx = r.get("ortools")
    return [f"{r['n']}:{r['m']}", f"{fmt_time(w1)} ({fmt_time(c1)} CPU)", f"{fmt_time(w2)} ({fmt_time(c2)} CPU)",
            f"{w1 / w2:.2f}x", f"{fmt_time(r['torch'])}{torch_note}", f"{r['torch'] / w1:.1f}x",
            "not installed" if orx is None else f"{fmt_time(orx)} (extrapolated from {r['ortools_tiles']} tiles)",
            "" if orx is None else f"{orx / w1:.1f}x",
            f"{r['torch_diff']:.1e}" + ("" if orx is None else f" / {r['ortools_diff']:.1e}")]


def _targets(r: dict) -> list[str]:
    (w1, _), (w2, _) = r["native_1"], r["native_2"]
    out = []
    if (r["n"], r["m"]) in TARGET_1_THREAD_S and r["size"] == 4096:
        limit = TARGET_1_THREAD_S[(r["n"], r["m"])]
        out.append(f"1 thread <= {limit:g} s: {'met' if w1 <= limit else 'missed'}")
    if "ortools" in r:
        out.append(f">= {TARGET_VS_ORTOOLS:g}x OR-tools: {'met' if r['ortools'] / w1 >= TARGET_VS_ORTOOLS else 'missed'}")
    out.append(f"2 threads not slower: {'met' if w2 <= w1 else 'missed'}")
    return [f"{r['n']}:{r['m']}", "; ".join(out)]


def run(size: int = 4096, nm=NM, repeats: int = 5, budget_s: float = 60.0, ortools_tiles: int = 2000,
        seed: int = 0, log=print) -> dict:
    """Every solver at every N:M on a size x size Gaussian float32 matrix; returns rows and tables."""
    if not native_available():
        raise RuntimeError(f"the compiled transposable solver is unavailable: {native_error()}")
    w = torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    before = _load()
    log(f"machine: {machine_info()}; {before}")
    rows = [bench_nm(w, n, m, repeats, budget_s, ortools_tiles, log) for n, m in nm]
    after = _load()
    head = ["N:M", "compiled, 1 thread", "compiled, 2 threads", "1 / 2 threads", "PyTorch exact, 1 thread",
            "PyTorch / compiled 1t", "OR-tools min-cost flow", "OR-tools / compiled 1t",
            "max kept-sum difference: PyTorch / OR-tools"]
    tables = {
        "solvers": markdown_table(head, [_row(r) for r in rows]),
        "targets": markdown_table(["N:M", "issue #12 targets"], [_targets(r) for r in rows]),
    }
    note = (f"{size}x{size} float32 Gaussian weights; compiled: median of {repeats} runs (wall, and CPU "
            f"time of the process); {before} before, {after} after")
    return {"machine": machine_info(), "note": note, "rows": rows, "tables": tables}
