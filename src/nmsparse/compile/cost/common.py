"""Shared pieces of the cost models: plan errors, the time-series rule, weight patterns, estimates.

Every target's model (``aie2``, ``gpu``, ``cpu``) returns a ``LayerEstimate``; the tiling helpers here
(``time_series``, ``_series_counted``, ``_bounds``, ``_distinct_splits``) are target-independent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..layers import LayerSpec

__all__ = ["PlanError", "time_series", "WeightPattern", "SubVolume", "LayerEstimate"]


class PlanError(ValueError):
    """A layer that cannot be planned on a target (it does not fit even split to the smallest tile)."""


def time_series(steps) -> float:
    """Time of (load, compute, write) steps: the sum for one step, else sum of per-step maxima."""
    steps = list(steps)
    if len(steps) == 1:
        return float(sum(steps[0]))
    return float(sum(max(s) for s in steps))


def _series_counted(items) -> tuple[float, int]:
    """items: (count, load, compute, write). Returns (time, iterations) with the time_series rule."""
    n = sum(c for c, *_ in items)
    if n == 1:
        (_, l, c, w), = [i for i in items if i[0]]
        return l + c + w, 1
    return sum(cnt * max(l, c, w) for cnt, l, c, w in items), n


def _bounds(units: int, parts: int) -> list[int]:
    return [(i * units) // parts for i in range(parts + 1)]


def _distinct_splits(units: int) -> list[int]:
    """Split counts 1..units giving distinct largest-part sizes ceil(units / n), fewest first."""
    out, last = [], None
    for n in range(1, units + 1):
        size = -(-units // n)
        if size != last:
            out.append(n)
            last = size
    return out


class WeightPattern:
    """Kept-block counts over rectangles of a layer's (Co units, Ci units) grid (dense: all kept)."""

    def __init__(self, R: int, C: int, bo: int, bi: int, grid=None):
        self.R, self.C, self.bo, self.bi = R, C, bo, bi
        self.dense = grid is None
        if grid is not None:
            g = np.asarray(grid, dtype=np.int64)
            if g.shape != (R, C):
                raise ValueError(f"block grid of shape {g.shape} does not match ({R}, {C})")
            self.ps = np.zeros((R + 1, C + 1), dtype=np.int64)
            self.ps[1:, 1:] = g.cumsum(0).cumsum(1)

    @classmethod
    def for_layer(cls, spec: LayerSpec, block, grid=None) -> "WeightPattern":
        bo, bi = block
        if spec.groups != 1:  # grouped conv: dense, Ci is not split (one unit of all channels)
            return cls(spec.co // bo, 1, bo, spec.ci) if spec.co % bo == 0 else cls(spec.co, 1, 1, spec.ci)
        if grid is not None:
            return cls(spec.co // bo, spec.ci // bi, bo, bi, grid)
        if spec.co % bo == 0 and spec.ci % bi == 0:
            return cls(spec.co // bo, spec.ci // bi, bo, bi)
        return cls(spec.co, spec.ci, 1, 1)  # channels not divisible by the block: channel units

    @property
    def total(self) -> int:
        return self.R * self.C

    @property
    def kept(self) -> int:
        return self.total if self.dense else int(self.ps[-1, -1])

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def nnz(self, r0, r1, c0, c1) -> int:
        if self.dense:
            return (r1 - r0) * (c1 - c0)
        p = self.ps
        return int(p[r1, c1] - p[r0, c1] - p[r1, c0] + p[r0, c0])

    def max_nnz(self, rb, cb) -> int:
        """Largest kept count over the tiles with row bounds rb and column bounds cb."""
        if self.dense:
            return int(max(np.diff(rb)) * max(np.diff(cb)))
        r, c = np.asarray(rb), np.asarray(cb)
        p = self.ps
        t = p[np.ix_(r[1:], c[1:])] - p[np.ix_(r[:-1], c[1:])] - p[np.ix_(r[1:], c[:-1])] + p[np.ix_(r[:-1], c[:-1])]
        return int(t.max())


@dataclass
class SubVolume:
    """One DDR-level step of an AIE2 plan: output columns w, channels co, reduction channels ci."""

    index: int
    w: tuple
    co: tuple
    ci: tuple
    in_bytes: int
    weight_bytes: int
    out_bytes: int
    macs: int
    kept_blocks: int
    memory_bytes: int
    load_s: float
    compute_s: float
    write_s: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["w"], d["co"], d["ci"] = list(self.w), list(self.co), list(self.ci)
        return d


@dataclass
class LayerEstimate:
    """A layer's estimated time on a target, as compiled (sparse where it is) and dense."""

    time_s: float
    dense_time_s: float
    bytes_moved: int
    dense_bytes_moved: int
    macs: int
    dense_macs: int
    iterations: int = 1
    tiles: dict = field(default_factory=dict)
    subvolumes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense_time_s / self.time_s if self.time_s > 0 else math.nan

    def to_dict(self, with_subvolumes: bool = True) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "subvolumes"}
        d["speedup"] = self.speedup
        if with_subvolumes:
            d["subvolumes"] = [s.to_dict() if isinstance(s, SubVolume) else s for s in self.subvolumes]
        return d
