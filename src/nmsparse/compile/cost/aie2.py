"""AIE2 cost model: two-level sub-volume tiling (DDR -> memory tiles -> cores) and time series per layer.

AIE2 (the block-sparsity paper's method, SPEC section 5)
--------------------------------------------------------
Activations are BHWC, weights Co x kh x kw x Ci. A layer's output (B, Ho, Wo, Co) and its
reduction over (kh, kw, Ci) is split into sub-volumes that fit the on-chip memory, two levels deep:

1. DDR <-> memory tiles (``memtile_kib`` per column, all columns together). The tile sizes are
   chosen by splitting W first, then Co, then Ci: the fewest Ci splits, then the fewest Co
   splits whose largest sub-volume fits with some W split (inputs, weights and outputs, x2 when
   double-buffered; partial sums at ``acc_bytes`` when Ci is split); then, of the W split counts
   that fit (the fewest and every larger one), the one with the lowest time series: the fewest
   can spread unevenly over the cores (28 columns in 6 tiles of 5 on 4 cores, where 7 tiles of 4
   give each core one column). Co and Ci split on block boundaries. Loop order: Co tiles, then
   W tiles, then Ci tiles. When Ci is not split the weights of a Co tile stay resident and load
   once for all its W tiles; otherwise every sub-volume loads its weights. Each sub-volume loads
   its input columns (with the kernel's halo) and weights from DDR at ``ddr_load_gbps`` x
   channels and writes its outputs (after its last Ci part) at ``ddr_write_gbps`` x channels.
   Only kept blocks move, plus their index (min(bitmask, ``index_bytes`` per kept block) per
   sub-volume).
2. Memory tiles <-> cores: a sub-volume is shared by the rows x cols cores (split W, then Co,
   then output rows so every core works); each core's piece is tiled again to fit
   ``core_memory_kib`` (same W, Co, Ci rule; kept blocks spread evenly over the piece), loaded at
   ``core_load_gbps`` and written at ``core_write_gbps`` per core, and computed at
   ``macs_per_cycle`` x ``clock_ghz``. A sub-volume's compute time is its slowest core's time.

With ``reuse_dense_tiling`` (default true) a sparse layer, at either level, also tries every
(Ci, Co) split after its own pick, in the same order, through the one its dense version gets
(which fits the sparse layer too), each with its W split counts, and keeps the fastest: the
rule applied to the smaller sparse weights can pick fewer Ci splits and then reload the inputs
for many more Co tiles, which would make a sparse layer slower than dense; and because a sparser
layer then has every choice a denser one has, it is never estimated slower (for the same layout
with blocks removed; another random layout can load the slowest core differently).
Set it false for the rule alone (still with the fastest W split count).

At each level the time is a time series over the steps (load, compute, write):
``sum(max(load_i, compute_i, write_i))``, which is ``max(load, compute, write) x iterations``
for identical steps; a single step takes ``load + compute + write`` (nothing to overlap).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from ..layers import LayerSpec
from .common import (LayerEstimate, PlanError, SubVolume, WeightPattern, _bounds, _distinct_splits, _series_counted,
                     time_series)

__all__ = ["plan_aie2", "estimate_aie2"]


class _Geo:
    """Byte and MAC counts of tiles of one layer on one AIE2 profile."""

    def __init__(self, spec: LayerSpec, pat: WeightPattern, prof):
        self.s, self.p = spec, pat
        self.db, self.acc = prof["dtype_bytes"], prof["acc_bytes"]
        self.ib = prof["index_bytes"]
        self.k = spec.kh * spec.kw
        self.grouped = spec.groups != 1

    def rows_in(self, out_rows: int) -> int:
        s = self.s
        return min(s.h_in, (out_rows - 1) * s.stride[0] + (s.kh - 1) * s.dilation[0] + 1)

    def cols_in(self, out_cols: int) -> int:
        s = self.s
        return min(s.w_in, (out_cols - 1) * s.stride[1] + (s.kw - 1) * s.dilation[1] + 1)

    def ci_channels(self, ci_units: int, co_units: int) -> int:
        if self.grouped:  # the input channels of the groups the output channels belong to
            return max(1, self.s.ci * co_units // self.p.R)
        return ci_units * self.p.bi

    def in_bytes(self, rows: int, out_cols: int, ci_units: int, co_units: int) -> int:
        return rows * self.cols_in(out_cols) * self.ci_channels(ci_units, co_units) * self.db

    def weight_bytes(self, kept: float, co_units: int, ci_units: int) -> float:
        if self.grouped:
            return co_units * self.p.bo * (self.s.ci // self.s.groups) * self.k * self.db
        values = kept * self.p.bo * self.p.bi * self.k * self.db
        if self.p.dense:
            return values
        index = min(math.ceil(co_units * ci_units / 8), self.ib * math.ceil(kept))
        return values + index

    def macs(self, out_positions: int, kept: float, co_units: int) -> float:
        if self.grouped:
            return out_positions * co_units * self.p.bo * (self.s.ci // self.s.groups) * self.k
        return out_positions * kept * self.p.bo * self.p.bi * self.k


def _fit_splits(units_w, units_co, units_ci, footprint, capacity, until=None) -> list[tuple[int, int, int]]:
    """(nci, nco, fewest nw) of the splits that fit, in the W-first, then Co, then Ci order.

    Only the rule's pick (the first) unless ``until`` = (nci, nco) is given: then every split that
    fits from the rule's pick through ``until`` in the same order (a sparse layer's candidates up to
    the split of its dense version, which fits it too).
    """
    out = []
    for nci in _distinct_splits(units_ci):
        for nco in _distinct_splits(units_co):
            if until is not None and out and (nci, nco) > tuple(until):
                return out
            if footprint(units_w, nco, nci) > capacity:  # even one column per tile: split Co/Ci
                continue
            lo, hi = 1, units_w
            while lo < hi:  # smallest nw that fits (footprint falls as nw grows)
                mid = (lo + hi) // 2
                if footprint(mid, nco, nci) <= capacity:
                    hi = mid
                else:
                    lo = mid + 1
            out.append((nci, nco, lo))
            if until is None:
                return out
    return out


def _fit_search(units_w, units_co, units_ci, footprint, capacity):
    """First (nci, nco, nw) in the W-first, then Co, then Ci order whose largest tile fits."""
    found = _fit_splits(units_w, units_co, units_ci, footprint, capacity)
    return found[0] if found else None


def _w_options(units_w: int, nw_min: int) -> list[int]:
    """W split counts to try: the fewest that fits, then every larger count giving a narrower tile.

    All of them fit (the footprint falls as W is split further). The fewest is not always the
    fastest: its tiles may not divide evenly over the cores (28 columns in 6 tiles of 5 on 4 cores
    leaves one core two columns per step, where 7 tiles of 4 give each core one), so the planner
    keeps the W, Co, Ci order and picks the W count whose time series is lowest.
    """
    return [n for n in _distinct_splits(units_w) if n >= nw_min]


def _fastest(candidates, time_of):
    """The candidate with the lowest time (the first one on a tie) and that time."""
    best, best_t = None, math.inf
    for cand in candidates:
        t = time_of(cand)
        if t < best_t * (1 - 1e-12):  # a near-tie keeps the earlier (fewer splits) candidate
            best, best_t = cand, t
    return best, best_t


def _core_tiling(g: _Geo, prof, rows, wt, co_units, ci_units, per_unit, partial, until=None):
    """[(nh, nci, nco, fewest nw)]: the W-first, then Co, then Ci split of a core piece that fits core
    memory (output rows are halved only when even the smallest tile does not fit); with ``until``
    = (nh, nci, nco), every split that fits from that one through ``until`` (same nh only)."""
    cap = prof["core_memory_kib"] * 1024
    buf = 2 if prof["double_buffer"] else 1

    def foot(nw, nco, nci, nh):
        w = -(-wt // nw)
        co = -(-co_units // nco)
        ci = -(-ci_units // nci)
        r = -(-rows // nh)
        ob = g.acc if (partial or nci > 1) else g.db
        return (buf * (g.rows_in(r) * g.cols_in(w) * g.ci_channels(ci, co) * g.db
                       + g.weight_bytes(per_unit * co * ci, co, ci))
                + buf * r * w * co * g.p.bo * ob)

    nh = 1
    while True:
        found = _fit_splits(wt, co_units, ci_units, lambda a, b, c: foot(a, b, c, nh), cap,
                            until=until[1:] if until is not None and until[0] == nh else None)
        if found:
            return [(nh,) + f for f in found]
        if nh >= rows:
            raise PlanError(f"layer {g.s.name!r} ({g.s.describe()}): one core piece of 1 row x 1 column x "
                            f"{g.p.bo} channels does not fit {prof['core_memory_kib']} KiB of core memory")
        nh = min(rows, nh * 2)


def _core_series(g: _Geo, prof, rows, wt, co_units, ci_units, per_unit, partial, tiling) -> tuple[float, int]:
    """Time series of one core piece under a tiling (nh, nci, nco, nw), grouping identical steps."""
    rate = prof["macs_per_cycle"] * prof["clock_ghz"] * 1e9
    lbw, wbw = prof["core_load_gbps"] * 1e9, prof["core_write_gbps"] * 1e9
    nh, nci, nco, nw = tiling
    r = -(-rows // nh)
    wsizes = np.diff(_bounds(wt, nw))
    cisizes = np.diff(_bounds(ci_units, nci))
    wsz, cisz = Counter(wsizes.tolist()), Counter(cisizes.tolist())
    cosz = Counter(np.diff(_bounds(co_units, nco)).tolist())
    first_w, last_ci = wsizes[0], cisizes[-1]
    ob = g.acc if (partial or nci > 1) else g.db
    items = []
    for co, nco_c in cosz.items():
        for w, nw_c in wsz.items():
            for ci, nci_c in cisz.items():
                kept_t = per_unit * co * ci
                inb = g.rows_in(r) * g.cols_in(w) * g.ci_channels(ci, co) * g.db
                wb = g.weight_bytes(kept_t, co, ci)
                c = g.macs(r * w, kept_t, co) / rate
                out = r * w * co * g.p.bo * ob / wbw
                if nci == 1:  # weights resident across the W tiles of a Co tile
                    firsts = 1 if w == first_w else 0
                    for cnt, load in ((firsts, (inb + wb) / lbw), (nw_c - firsts, inb / lbw)):
                        if cnt:
                            items.append((nco_c * cnt * nh, load, c, out))
                else:
                    lasts = 1 if ci == last_ci else 0
                    for cnt, wr in ((lasts, out), (nci_c - lasts, 0.0)):
                        if cnt:
                            items.append((nco_c * nw_c * cnt * nh, (inb + wb) / lbw, c, wr))
    return _series_counted(items)


def _core_time(g: _Geo, prof, rows: int, wt: int, co_units: int, ci_units: int, kept: float,
               partial: bool) -> tuple[float, dict]:
    """Time of one core's piece (rows x wt outputs, co_units x ci_units, kept blocks) from its memtile.

    The piece is tiled by the W, Co, Ci rule for its own (kept-block) size, with the fastest of the
    W split counts that fit (``_w_options``); for a sparse piece the tiling a dense piece would get
    is tried too and the faster is used (kept blocks never make a layer slower than its dense
    tiling would).
    """
    per_unit = kept / (co_units * ci_units) if co_units * ci_units else 0.0
    args = (g, prof, rows, wt, co_units, ci_units)
    rules = _core_tiling(*args, per_unit, partial)
    if not g.p.dense and per_unit < 1 and prof.get("reuse_dense_tiling", True):
        dense_tiling = _core_tiling(*args, 1.0, partial)[0]
        # every split from the piece's own through the dense piece's (it fits the sparse piece too),
        # so that a sparser piece has at least the choices of a denser one
        rules = _core_tiling(*args, per_unit, partial, until=dense_tiling[:3])
        if dense_tiling[0] != rules[0][0]:  # the dense piece splits its rows: try that split as well
            rules.append(dense_tiling)
    tilings = list(dict.fromkeys((nh, nci, nco, nw) for nh, nci, nco, nw_min in rules
                                 for nw in _w_options(wt, nw_min)))
    series = {}

    def time_of(tiling):
        series[tiling] = _core_series(g, prof, rows, wt, co_units, ci_units, per_unit, partial, tiling)
        return series[tiling][0]

    (nh, nci, nco, nw), t = _fastest(tilings, time_of)
    n = series[(nh, nci, nco, nw)][1]
    return t, {"core_tiles": {"rows": nh, "w": nw, "co": nco, "ci": nci}, "core_iterations": n,
               "core_rows": -(-rows // nh)}


def plan_aie2(spec: LayerSpec, pat: WeightPattern, prof, with_subvolumes: bool = True,
              tiles: tuple | None = None, until: tuple | None = None) -> tuple[float, dict]:
    """(time, plan) of one layer on an AIE2 profile for the kept blocks in ``pat``.

    ``tiles`` = (n_ci, n_co, n_w) forces the DDR-level split (it must fit); default: the W, Co, Ci
    rule (fewest Ci, then Co splits that fit) with the fastest W split count that fits (``_w_options``).
    ``until`` = (n_ci, n_co) also tries, in the same order, every split after the rule's pick
    through that one (``estimate_aie2`` passes the dense layer's) and keeps the fastest.
    """
    rows_a, cols_a = prof["array"]
    P = rows_a * cols_a
    cap = prof["memtile_kib"] * 1024 * cols_a
    buf = 2 if prof["double_buffer"] else 1
    ch = cols_a * prof["ddr_channels_per_column"]
    ld, wr = ch * prof["ddr_load_gbps"] * 1e9, ch * prof["ddr_write_gbps"] * 1e9
    g = _Geo(spec, pat, prof)
    B, Ho, Wo = spec.batch, spec.h_out, spec.w_out
    out_rows = B * Ho
    in_rows = B * g.rows_in(Ho)

    def foot(nw, nco, nci):
        wt = -(-Wo // nw)
        rb, cb = _bounds(pat.R, nco), _bounds(pat.C, nci)
        kept = pat.max_nnz(rb, cb)
        co, ci = max(np.diff(rb)), max(np.diff(cb))
        ob = g.acc if nci > 1 else g.db
        return (buf * (in_rows * g.cols_in(wt) * g.ci_channels(ci, co) * g.db + g.weight_bytes(kept, co, ci))
                + buf * out_rows * wt * co * pat.bo * ob)

    found = _fit_search(Wo, pat.R, pat.C, foot, cap) if tiles is None else tuple(tiles)
    if tiles is not None and foot(tiles[2], tiles[1], tiles[0]) > cap:
        raise PlanError(f"layer {spec.name!r}: forced tiles {tiles} do not fit the memory tiles")
    if found is None:
        raise PlanError(f"layer {spec.name!r} ({spec.describe()}): even a sub-volume of one output column, "
                        f"{pat.bo} output and {pat.bi} input channels needs {foot(Wo, pat.R, pat.C)} bytes, more than "
                        f"the {cap} bytes of memory tiles of a {rows_a}x{cols_a} array")
    core_cache: dict = {}  # core-piece times, shared by the candidate splits

    def build(nci, nco, nw, with_subs):
        wb_, cob, cib = _bounds(Wo, nw), _bounds(pat.R, nco), _bounds(pat.C, nci)
        subs, steps = [], []
        core_summary: dict = {}
        totals = Counter()
        idx = 0
        for a in range(nco):
            r0, r1 = cob[a], cob[a + 1]
            cou = r1 - r0
            # co groups over the cores (for the slowest core's kept count)
            for b in range(nw):
                w0, w1 = wb_[b], wb_[b + 1]
                wt = w1 - w0
                for c in range(nci):
                    c0, c1 = cib[c], cib[c + 1]
                    ciu = c1 - c0
                    kept = pat.nnz(r0, r1, c0, c1)
                    inb = in_rows * g.cols_in(wt) * g.ci_channels(ciu, cou) * g.db
                    wload = g.weight_bytes(kept, cou, ciu) if (nci > 1 or b == 0) else 0
                    last = c == nci - 1
                    outb = out_rows * wt * cou * pat.bo * g.db if last else 0
                    macs = g.macs(out_rows * wt, kept, cou)
                    # level 2: split W, then Co, then rows over the cores
                    p_w = min(P, wt)
                    p_co = min(P // p_w, cou)
                    p_h = min(P // (p_w * p_co), out_rows)
                    gb = [r0 + x for x in _bounds(cou, p_co)]
                    core_kept = pat.max_nnz(gb, [c0, c1]) if not pat.dense else -(-cou // p_co) * ciu
                    key = (-(-out_rows // p_h), -(-wt // p_w), -(-cou // p_co), ciu, core_kept, nci > 1)
                    if key not in core_cache:
                        core_cache[key] = _core_time(g, prof, *key)
                    ct, core_info = core_cache[key]
                    if not core_summary:
                        core_summary = {"cores_used": p_w * p_co * p_h, "split": {"w": p_w, "co": p_co, "rows": p_h},
                                        "piece": {"rows": key[0], "cols": key[1], "co": key[2] * pat.bo,
                                                  "ci": key[3] * pat.bi}, **core_info}
                    mem = (buf * (inb + g.weight_bytes(kept, cou, ciu))
                           + buf * out_rows * wt * cou * pat.bo * (g.acc if nci > 1 else g.db))
                    step = (inb + wload) / ld, ct, outb / wr
                    steps.append(step)
                    totals.update(load=inb + wload, write=outb, macs=macs)
                    if with_subs:
                        subs.append(SubVolume(idx, (w0, w1), (r0 * pat.bo, r1 * pat.bo), (c0 * pat.bi, c1 * pat.bi),
                                              int(inb), int(round(wload)), int(outb), int(round(macs)), int(kept),
                                              int(round(mem)), step[0], step[1], step[2]))
                    idx += 1
        t = time_series(steps)
        plan = {"tiles": {"w": nw, "co": nco, "ci": nci}, "iterations": len(steps),
                "bytes_loaded": int(round(totals["load"])), "bytes_written": int(round(totals["write"])),
                "macs": int(round(totals["macs"])), "memory_capacity": int(cap), "subvolumes": subs,
                "cores": core_summary,
                "load_s": sum(s[0] for s in steps), "compute_s": sum(s[1] for s in steps),
                "write_s": sum(s[2] for s in steps)}
        return t, plan

    if tiles is None:
        splits = _fit_splits(Wo, pat.R, pat.C, foot, cap, until=until) if until is not None else [found]
        candidates = [(nci, nco, nw) for nci, nco, nw_min in splits for nw in _w_options(Wo, nw_min)]
        (nci, nco, nw), _ = _fastest(candidates, lambda tl: build(*tl, False)[0])
    else:
        nci, nco, nw = found
    t, plan = build(nci, nco, nw, with_subvolumes)
    plan["rule_tiles"] = {"w": found[2], "co": found[1], "ci": found[0]}
    return t, plan


def estimate_aie2(spec, fmt, prof, grid=None, with_subvolumes=True) -> LayerEstimate:
    """Plan a layer dense and, for a block grid, sparse on an AIE2 profile (N:M runs dense)."""
    block = tuple(prof["block"])
    notes = []
    sparse_grid = grid if (fmt is not None and fmt.kind == "block" and grid is not None) else None
    if fmt is not None and fmt.kind == "nm":
        notes.append(f"{fmt.n}:{fmt.m} weights: the AIE2 model has no N:M path; estimated dense")
    dense_pat = WeightPattern.for_layer(spec, block)
    td, pd = plan_aie2(spec, dense_pat, prof, with_subvolumes=sparse_grid is None and with_subvolumes)
    if sparse_grid is None:
        return LayerEstimate(td, td, pd["bytes_loaded"] + pd["bytes_written"], pd["bytes_loaded"] + pd["bytes_written"],
                             pd["macs"], pd["macs"], pd["iterations"], pd["tiles"], pd.pop("subvolumes"),
                             {**pd, "dense": {k: v for k, v in pd.items() if k != "subvolumes"}}, notes)
    sp = WeightPattern.for_layer(spec, block, grid)
    # With reuse_dense_tiling the sparse layer may take any split from its own rule's pick through
    # the dense layer's (which fits it too): a sparser layer then has every choice a denser one has,
    # so it is never estimated slower.
    reuse = prof.get("reuse_dense_tiling", True)
    dense_split = (pd["tiles"]["ci"], pd["tiles"]["co"])
    ts, ps = plan_aie2(spec, sp, prof, with_subvolumes=with_subvolumes, until=dense_split if reuse else None)
    chosen = (ps["tiles"]["ci"], ps["tiles"]["co"])
    own = (ps["rule_tiles"]["ci"], ps["rule_tiles"]["co"])
    ps["tiling"] = ("own (W, Co, Ci rule)" if chosen == own else
                    "the dense layer's Co/Ci split (faster than its own)" if chosen == dense_split else
                    "between its own and the dense layer's Co/Ci split (faster than its own)")
    subs = ps.pop("subvolumes")
    pd.pop("subvolumes", None)
    return LayerEstimate(ts, td, ps["bytes_loaded"] + ps["bytes_written"], pd["bytes_loaded"] + pd["bytes_written"],
                         ps["macs"], pd["macs"], ps["iterations"], ps["tiles"], subs, {**ps, "dense": pd}, notes)
