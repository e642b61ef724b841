"""Transposable N:M masks: every m x m tile keeps exactly n per row and per column.

Such a mask makes both W and W^T N:M, so the forward and the backward-data products can
both run on sparse hardware. "exact" maximises the kept sum of |w| per tile (a maximum-
weight bipartite b-matching); "greedy" is the 2-approximation of Hubara et al. (2021).

This is the PyTorch implementation (any device). ``nmsparse.transposable_mask`` is
``kernels.transposable.transposable_mask``: the same contract, with a compiled exact solver for
m >= 4 on the CPU (kernels/ sits above patterns/, so the dispatch lives there).
"""

from __future__ import annotations

import functools
import itertools

import torch

from .checks import check_2d, check_divisible, check_float_tensor, check_nm
from .nm import magnitude_key, topn_in_groups

METHODS = ("exact", "greedy")
_ENUMERATE_MAX_M = 4  # K(4, 2) = 90 patterns; at m = 8 there are ~1.2e11, so use the flow solver
_CPU_CHUNK_TILES = 1 << 13


def conv_to_2d(w: torch.Tensor) -> torch.Tensor:
    """View a conv weight (Co, Ci, kh, kw) as (Co, kh*kw*Ci), channels-last order.

    This is the matrix of the convolution's implicit GEMM in channels_last, so a transposable
    mask on it serves both the forward product and the backward-data product.
    """
    if w.dim() != 4:
        raise ValueError(f"conv_to_2d expects a 4-D conv weight (Co, Ci, kh, kw), got shape {tuple(w.shape)}")
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def conv_from_2d(w2d: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``conv_to_2d``: back to (Co, Ci, kh, kw) for the given conv weight shape."""
    co, ci, kh, kw = shape
    if tuple(w2d.shape) != (co, kh * kw * ci):
        raise ValueError(f"conv_from_2d: got shape {tuple(w2d.shape)}, expected {(co, kh * kw * ci)} for {tuple(shape)}")
    return w2d.reshape(co, kh, kw, ci).permute(0, 3, 1, 2)


def to_tiles(w: torch.Tensor, m: int) -> torch.Tensor:
    """(R, C) -> (R/m * C/m, m, m) tiles in row-major tile order (a copy)."""
    r, c = w.shape
    return w.reshape(r // m, m, c // m, m).permute(0, 2, 1, 3).reshape(-1, m, m)


def from_tiles(tiles: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``to_tiles``."""
    r, c = shape
    m = tiles.shape[-1]
    return tiles.reshape(r // m, c // m, m, m).permute(0, 2, 1, 3).reshape(r, c)


@functools.lru_cache(maxsize=None)
def _patterns_cpu(n: int, m: int) -> torch.Tensor:
    """All m x m 0/1 matrices with n ones per row and column, as a (m*m, K) float64 matrix."""
    rows = [sum(1 << j for j in c) for c in itertools.combinations(range(m), n)]
    found = []
    for choice in itertools.product(rows, repeat=m):
        if all(sum((r >> j) & 1 for r in choice) == n for j in range(m)):
            found.append([(r >> j) & 1 for r in choice for j in range(m)])
    return torch.tensor(found, dtype=torch.float64).t().contiguous()


def enumerate_patterns(n: int, m: int, device=None) -> torch.Tensor:
    """(K, m, m) bool tensor of every valid transposable tile pattern (only sensible for m <= 4)."""
    p = _patterns_cpu(n, m)
    return p.t().reshape(-1, m, m).bool().to(device)


def _tile_weights(w: torch.Tensor, m: int) -> torch.Tensor:
    """|w| tiles in float64 with non-finite entries replaced by a value above any finite sum."""
    a = to_tiles(magnitude_key(w.detach()).to(torch.float64), m)
    finite = torch.isfinite(a)
    if not bool(finite.all()):
        top = a[finite].max() if bool(finite.any()) else a.new_tensor(1.0)
        big = min(float(top) * 4 * m * m + 1.0, torch.finfo(torch.float64).max / (4 * m * m))
        a = torch.where(finite, a, a.new_tensor(big))
    return a


def _exact_enumerate(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    pats = _patterns_cpu(n, m).to(a.device)
    best = (a.reshape(a.shape[0], m * m) @ pats).argmax(dim=1)  # first best on ties
    return pats.t()[best].reshape(-1, m, m).bool()


def _exact_flow(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Optimal b-matching per tile by successive shortest paths.

    Start from each row's top-n: optimal for the problem without column limits, with row
    potentials at the row thresholds making every reduced cost non-negative. Then move units
    from over-full to under-full columns along shortest residual paths
    (col -(selected, +w)-> row -(unselected, -w)-> col ...), which keeps the solution optimal
    for its current column loads; when no column is over-full it is optimal for the true problem.
    Distances use Bellman-Ford, vectorised over all tiles that still have an over-full column.
    """
    t = a.shape[0]
    x = topn_in_groups(a.reshape(-1, m), n).view(t, m, m)
    excess = x.sum(dim=1, dtype=torch.int64) - n  # per column
    inf = torch.tensor(float("inf"), dtype=a.dtype, device=a.device)
    while True:
        act = (excess > 0).any(dim=1).nonzero().squeeze(1)
        if act.numel() == 0:
            return x
        w, xa, ex = a[act], x[act], excess[act]
        k = act.numel()
        tol = 1e-12 * m * w.amax(dim=(1, 2)).clamp_min(1e-300).unsqueeze(1)
        dc = torch.where(ex > 0, 0.0, inf)
        dr = torch.full((k, m), float("inf"), dtype=a.dtype, device=a.device)
        pred_c = torch.full((k, m), -1, dtype=torch.int64, device=a.device)  # row feeding column
        pred_r = torch.full((k, m), -1, dtype=torch.int64, device=a.device)  # column feeding row
        sel_cost = torch.where(xa, w, inf)  # column j -> row i cancels (i, j): +w
        add_cost = torch.where(xa, inf, -w)  # row i -> column j adds (i, j): -w
        # Labels change only on a strict improvement (beyond rounding), which keeps the
        # predecessor graph a tree even among the zero-cost cycles that ties create.
        for _ in range(4 * m + 4):
            cand, arg = (dc.unsqueeze(1) + sel_cost).min(dim=2)
            better_r = cand < dr - tol
            dr = torch.where(better_r, cand, dr)
            pred_r = torch.where(better_r, arg, pred_r)
            cand, arg = (dr.unsqueeze(2) + add_cost).min(dim=1)
            better_c = cand < dc - tol
            dc = torch.where(better_c, cand, dc)
            pred_c = torch.where(better_c, arg, pred_c)
            if not bool(better_c.any()):
                break
        # Sink: the under-full column at the smallest distance (one always exists and is reachable).
        dist = torch.where(ex < 0, dc, inf)
        col = dist.argmin(dim=1)
        end = col.clone()
        tiles = torch.arange(k, device=a.device)
        live = torch.ones(k, dtype=torch.bool, device=a.device)
        for _ in range(2 * m + 1):
            row = pred_c[tiles, col]
            live = live & (row >= 0)
            if not bool(live.any()):
                break
            prev = pred_r[tiles, row.clamp_min(0)]
            ti, ri = tiles[live], row[live]
            xa[ti, ri, col[live]] = True
            xa[ti, ri, prev[live]] = False
            col = torch.where(live, prev, col)
        else:
            raise RuntimeError("transposable_mask: shortest-path trace did not terminate (numerical cycle)")
        start = col
        ex[tiles, start] -= 1
        ex[tiles, end] += 1
        x[act], excess[act] = xa, ex


def _greedy(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Accept entries by descending |w| while their row and column still have room (2-approx)."""
    t = a.shape[0]
    order = torch.sort(a.reshape(t, m * m), dim=1, descending=True, stable=True).indices
    rows, cols = order // m, order % m
    rc = torch.zeros((t, m), dtype=torch.int32, device=a.device)
    cc = torch.zeros((t, m), dtype=torch.int32, device=a.device)
    keep = torch.zeros((t, m * m), dtype=torch.bool, device=a.device)
    idx = torch.arange(t, device=a.device)
    for k in range(m * m):
        r, c = rows[:, k], cols[:, k]
        ok = (rc[idx, r] < n) & (cc[idx, c] < n)
        keep[idx, order[:, k]] = ok
        rc[idx, r] += ok
        cc[idx, c] += ok
    return keep.view(t, m, m)


def transposable_mask(w: torch.Tensor, n: int, m: int, method: str = "exact") -> torch.Tensor:
    """Bool mask of 2-D w whose every m x m tile keeps n entries per row and column.

    method="exact" maximises the kept sum of |w| in each tile (enumeration of all valid tiles
    for m <= 4, a batched min-cost-flow solver otherwise). method="greedy" is the fast
    2-approximation: kept sum at least half the optimum, and some rows or columns may keep
    fewer than n. NaN and inf count as the largest magnitude.
    """
    check_float_tensor(w, "w")
    n, m = check_nm(n, m)
    check_2d(w, "w")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_divisible(w.shape[0], m, "w dim 0", w.shape)
    check_divisible(w.shape[1], m, "w dim 1", w.shape)
    if w.numel() == 0 or n in (0, m):
        return torch.full(w.shape, n == m, dtype=torch.bool, device=w.device)
    if method == "greedy":
        solve = _greedy
    elif m <= _ENUMERATE_MAX_M:
        solve = _exact_enumerate
    else:
        solve = _exact_flow
    # Tiles are independent: solve bands of tile rows so the float64 temporaries stay small.
    tiles_per_row = w.shape[1] // m
    band = w.shape[0] if w.device.type != "cpu" else m * max(1, _CPU_CHUNK_TILES // tiles_per_row)
    out = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    for r in range(0, w.shape[0], band):
        part = w[r:r + band]
        out[r:r + band] = from_tiles(solve(_tile_weights(part, m), n, m), part.shape)
    return out


def is_transposable(mask: torch.Tensor, n: int, m: int, exact: bool = True) -> bool:
    """True if every m x m tile of 2-D mask has exactly (or, exact=False, at most) n per row and column."""
    check_2d(mask, "mask")
    if mask.shape[0] % m or mask.shape[1] % m:
        return False
    t = to_tiles(mask != 0, m)
    rs, cs = t.sum(2), t.sum(1)
    if exact:
        return bool((rs == n).all() and (cs == n).all())
    return bool((rs <= n).all() and (cs <= n).all())
