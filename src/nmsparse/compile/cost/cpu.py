"""CPU cost model of this package's block-sparse kernels, with coefficients measured by ``calibrate_cpu`` (targets/cpu.yaml)."""

from __future__ import annotations

import numpy as np

from ...kernels.block_cpu import CHUNK, GEMV_ROWS, direct_geometry
from ..layers import LayerFormat, LayerSpec
from .common import LayerEstimate

__all__ = ["cpu_kind", "DEFAULT_CACHE", "kernel_work", "cpu_dense_time", "cpu_sparse_time", "estimate_cpu"]


def cpu_kind(spec: LayerSpec) -> str:
    """Which CPU model applies: "gemv" (Linear on < 8 rows), "linear", "1x1" (plain 1x1 conv) or "kxk"."""
    if spec.kind == "linear":
        return "gemv" if spec.w_out < GEMV_ROWS else "linear"
    return "1x1" if (spec.kh, spec.kw, spec.stride, spec.padding) == (1, 1, (1, 1), (0, 0)) else "kxk"


DEFAULT_CACHE = {"l2_kib": 1024, "llc_kib": 32768}


def kernel_work(spec: LayerSpec, kept_blocks: int, cache: dict | None = None) -> dict:
    """Work counts of the block kernel for ``kept_blocks`` kept 8x8 blocks of the (Co, Ci) grid.

    The kernel (direct path, ``kernels.block_cpu.direct_geometry``) rewrites the input once into
    padded stride-phase planes (``copy_floats``; none for a plain 1x1 conv or a Linear), walks
    ``lanes`` grid positions per image in chunks of 48 (3 vectors of 16; a last partial chunk uses
    ceil(n / 16) vectors), visits each kept block once per chunk, prefetches each chunk's input rows
    (``fetch_bytes``) and writes every output once (``out_floats``).
    Kept weights larger than the L2 cache are re-read from further away once per chunk
    (``l2_miss_bytes``); a few-rows Linear reads its weights once, from memory when they exceed the
    last-level cache (``llc_miss_bytes``).
    """
    cache = cache or DEFAULT_CACHE
    k = spec.kh * spec.kw
    kept_mat = kept_blocks * k
    wbytes = kept_mat * 256
    if cpu_kind(spec) == "gemv":
        return {"macs": kept_mat * 64 * spec.w_out, "weight_bytes": wbytes, "lane_macs": 0,
                "block_visits": 0, "copy_floats": 0, "fetch_bytes": 0, "out_floats": spec.co * spec.w_out,
                "l2_miss_bytes": 0, "llc_miss_bytes": wbytes if wbytes > cache["llc_kib"] * 1024 else 0}
    geo = direct_geometry(spec.ci, spec.h_in, spec.w_in, (spec.kh, spec.kw), spec.stride, spec.padding, spec.dilation)
    full, tail = divmod(geo["lanes"], CHUNK)
    vectors = spec.batch * (3 * full + -(-tail // 16))
    chunks = spec.batch * (full + (1 if tail else 0))
    return {"macs": kept_mat * 64 * spec.batch * spec.h_out * spec.w_out, "weight_bytes": wbytes,
            "lane_macs": kept_mat * 64 * 16 * vectors, "block_visits": kept_mat * chunks,
            "copy_floats": spec.batch * geo["copy_floats"], "fetch_bytes": chunks * geo["rows"] * geo["span"] * 4,
            "out_floats": spec.co * spec.batch * spec.h_out * spec.w_out,
            "l2_miss_bytes": wbytes * chunks if wbytes > cache["l2_kib"] * 1024 else 0, "llc_miss_bytes": 0}


def cpu_dense_time(spec: LayerSpec, prof) -> float:
    """PyTorch's dense F.conv2d / F.linear on the calibrated CPU (see targets/cpu.yaml)."""
    d = prof["dense"]
    key = {"1x1": "conv1x1", "kxk": "convkxk", "linear": "linear", "gemv": "gemv"}[cpu_kind(spec)]
    if spec.kind == "conv" and spec.kh * spec.kw == 1:
        key = "conv1x1"  # strided / padded 1x1 convs run the same dense path
    rows = spec.w_out if key == "gemv" else 1
    t = (d["overhead_us"] * 1e-6 + spec.macs / (d[f"{key}_gmacs"] * 1e9)
         + rows * spec.weight_numel * 4 / (d[f"{key}_weight_gbps"] * 1e9))
    cache = prof.get("cache", DEFAULT_CACHE)
    if key == "gemv" and spec.weight_numel * 4 > cache["llc_kib"] * 1024:
        t += spec.weight_numel * 4 / (d["gemv_dram_gbps"] * 1e9)
    return t


def cpu_sparse_time(spec: LayerSpec, kept_blocks: int, prof) -> float:
    """The block kernel on the calibrated CPU (see targets/cpu.yaml)."""
    s = prof["sparse"]
    work = kernel_work(spec, kept_blocks, prof.get("cache"))
    kind = cpu_kind(spec)
    if kind == "gemv":
        return (s["overhead_us"] * 1e-6 + work["macs"] / (s["gemv_gmacs"] * 1e9)
                + work["weight_bytes"] / (s["gemv_weight_gbps"] * 1e9)
                + work["llc_miss_bytes"] / (s["gemv_dram_gbps"] * 1e9))
    pk = "1x1" if kind in ("1x1", "linear") else "kxk"
    t = (s["overhead_us"] * 1e-6 + work["copy_floats"] / (s["copy_gfloats"] * 1e9)
         + work["fetch_bytes"] / (s["fetch_gbps"] * 1e9) + work["out_floats"] / (s["store_gfloats"] * 1e9)
         + work["lane_macs"] / (s[f"gmacs_{pk}"] * 1e9) + work["block_visits"] / (s[f"gblocks_{pk}"] * 1e9)
         + work["l2_miss_bytes"] / (s["l2_miss_gbps"] * 1e9))
    if spec.kind == "linear":  # x^T copy before the kernel
        t += spec.ci * spec.w_out * 8 / (prof["memory_gbps"] * 1e9)
    return t


def estimate_cpu(spec: LayerSpec, fmt: LayerFormat | None, prof, grid=None, decision: str | None = None) -> LayerEstimate:
    """Estimate on the calibrated CPU; ``decision`` ("sparse"/"dense") forces the path (else the faster)."""
    td = cpu_dense_time(spec, prof)
    dense_bytes = (spec.in_numel + spec.out_numel + spec.weight_numel) * 4
    details = {"dense_s": td}
    if fmt is None or fmt.kind != "block" or spec.groups != 1 or spec.notes:
        notes = []
        if fmt is not None and fmt.kind == "nm":
            notes.append(f"{fmt.n}:{fmt.m}: no CPU N:M kernel, runs dense")
        return LayerEstimate(td, td, dense_bytes, dense_bytes, spec.macs, spec.macs, details=details, notes=notes)
    bo, bi = prof["block"]
    kept = int(round(fmt.block_density * (spec.co // bo) * (spec.ci // bi))) if grid is None else int(np.asarray(grid).sum())
    ts = cpu_sparse_time(spec, kept, prof)
    details["sparse_s"] = ts
    sparse_bytes = int((spec.in_numel + spec.out_numel) * 4 + kept * bo * bi * spec.kh * spec.kw * 4
                       + kept * spec.kh * spec.kw * 4)
    use = decision or ("sparse" if ts < td else "dense")
    details["path"] = use
    notes = [] if decision else ([] if use == "sparse" else ["estimated sparse kernel slower: runs dense"])
    if use == "dense":
        return LayerEstimate(td, td, dense_bytes, dense_bytes, spec.macs, spec.macs, details=details, notes=notes)
    macs = kept * bo * bi * spec.kh * spec.kw * spec.batch * spec.h_out * spec.w_out
    return LayerEstimate(ts, td, sparse_bytes, dense_bytes, macs, spec.macs, details=details, notes=notes)
