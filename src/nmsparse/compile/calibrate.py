"""`calibrate_cpu`: measure this machine for the cpu profile (dense rates, block-sparse kernel, bandwidth).

All timings are medians of alternating repeats (``runtime.alternating_timer``) on random float32
data, with ``threads`` PyTorch threads (default 1: stable medians on a shared machine).

* memory bandwidth: a 64 MB tensor copy, bytes read + written per second;
* dense (``F.conv2d`` / ``F.linear``, what a PyTorch user runs): a per-call overhead from a tiny
  conv; multiply-accumulate rates for 1x1 convs, larger kernels and Linear on 8+ rows; for
  Linear on fewer rows, the rate at which the weights stream (bytes per second, per row);
* block-sparse (the block kernel: native if it builds, else PyTorch BSR): per-call overhead from a
  tiny layer; for each case the time with no kept block (rewriting the input into padded phase
  planes, fetching each chunk's input rows, storing outputs) gives the copy, fetch and store rates,
  and the extra time at kept-block densities 0.25, 0.5 and 1.0 the MAC rate, separately for plain
  1x1 convs (which read x itself) and the others; the weight-streaming rate of the few-rows Linear
  kernel. The effective rate per
  density is recorded too (informational), and the plain ``torch.mm`` GEMM rate.

Cases are ResNet-50 / VGG-16-like shapes, cropped so that calibration takes well under a minute
(three passes over all cases; quick: one pass). The result is a profile dict (kind "cpu"); with ``path`` it is written as YAML.
"""

from __future__ import annotations

import datetime
import os
import statistics

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..common.system import machine_info
from ..kernels.block_cpu import BlockSparseMatrix, block_sparse_conv2d, block_sparse_linear, resolve_backend
from .cost import DEFAULT_CACHE, cpu_dense_time, cpu_kind, cpu_sparse_time, kernel_work
from .layers import LayerSpec
from .runtime import alternating_timer

__all__ = ["calibrate_cpu", "write_profile", "cache_sizes", "CONV_CASES", "LINEAR_CASES"]

# (ci, co, k, hw, stride)
CONV_CASES = [(64, 64, 3, 56, 1), (128, 128, 3, 28, 1), (256, 256, 3, 14, 1), (512, 512, 3, 7, 1), (512, 512, 3, 4, 1),
              (256, 256, 3, 28, 1), (64, 64, 3, 112, 1), (64, 64, 3, 160, 1), (128, 128, 3, 56, 2), (256, 256, 3, 28, 2),
              (256, 64, 1, 56, 1), (64, 256, 1, 56, 1), (128, 512, 1, 28, 1), (512, 128, 1, 28, 1), (1024, 256, 1, 14, 1),
              (256, 1024, 1, 14, 1), (512, 2048, 1, 7, 1), (2048, 512, 1, 4, 1), (256, 512, 1, 28, 2),
              (1024, 2048, 1, 14, 2)]
LINEAR_CASES = [(2048, 1024, 1), (2048, 1024, 4), (4096, 4096, 1), (1024, 1024, 64), (4096, 1024, 16)]  # (in, out, rows)
DENSITIES = (0.25, 0.5, 1.0)


def _bandwidth(timer) -> float:
    src = torch.randn(16 * 1024 * 1024)
    dst = torch.empty_like(src)
    t, = timer([lambda: dst.copy_(src)])
    return 2 * src.numel() * 4 / t / 1e9


def _masked(w: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    r, c = w.shape[0] // 8, w.shape[1] // 8
    keep = torch.ones(r * c, dtype=torch.bool)
    keep[torch.randperm(r * c, generator=g)[:round((1 - density) * r * c)]] = False
    m = keep.view(r, c).repeat_interleave(8, 0).repeat_interleave(8, 1)
    return w * m.view(m.shape + (1,) * (w.dim() - 2))


def _nnls(A, b) -> list[float]:
    A, b = np.asarray(A, dtype=float), np.asarray(b, dtype=float)
    if len(b) == 0:
        return [0.0] * A.shape[1] if A.ndim == 2 else []
    w = 1.0 / np.maximum(np.abs(b), 1e-12)  # relative errors: big cases must not drown small ones
    A, b = A * w[:, None], b * w
    scale = np.maximum(np.abs(A).max(0), 1e-30)  # columns of very different magnitudes
    try:
        from scipy.optimize import nnls

        x = nnls(A / scale, b)[0]
    except ImportError:  # drop negative coefficients and refit
        active, x = list(range(A.shape[1])), np.zeros(A.shape[1])
        while active:
            sol = np.linalg.lstsq((A / scale)[:, active], b, rcond=None)[0]
            if (sol >= 0).all():
                x[active] = sol
                break
            active = [a for a, v in zip(active, sol) if v > 0]
    return list(x / scale)


def _rate(coef: float, default: float) -> float:
    """1 / (seconds per unit) in G units per second; a zero coefficient (not measurable) -> default."""
    return round(float(1.0 / coef / 1e9), 3) if coef > 0 else float(default)


@torch.no_grad()
def calibrate_cpu(path=None, *, threads: int = 1, quick: bool = False, backend: str = "auto", seed: int = 0,
                  log=print, timer=None) -> dict:
    """Measure this CPU; returns the cpu profile dict and writes it to ``path`` (YAML) when given."""
    passes = 1 if quick else 3
    if timer is None:
        def timer(fns):
            return alternating_timer(fns, repeats=3, budget_s=1.0, samples=True)
    use = resolve_backend(backend)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    cache = cache_sizes()
    try:
        med = (lambda fns: [statistics.median(v) if isinstance(v, list) else v for v in timer(fns)])
        bw = _bandwidth(med)
        tiny_x = torch.randn(1, 8, 4, 4)
        tiny_w = torch.randn(8, 8, 1, 1)
        tiny_m = BlockSparseMatrix.from_weight(tiny_w)
        ovh = alternating_timer([lambda: F.conv2d(tiny_x, tiny_w), lambda: block_sparse_conv2d(tiny_x, tiny_m, 1, backend=use)],
                                repeats=41, budget_s=0.5)
        d_ovh, s_ovh = ovh
        a = torch.randn(1024, 1024)
        tmm, = med([lambda: a @ a])
        gemm_gflops = 2 * 1024 ** 3 / tmm / 1e9
        log(f"memory bandwidth (copy) {bw:.1f} GB/s; call overhead dense {d_ovh * 1e6:.1f} us, sparse "
            f"{s_ovh * 1e6:.1f} us; torch.mm 1024^3 {gemm_gflops:.1f} GFLOP/s; sparse backend {use}")
        dense_fit = {k: ([], []) for k in ("1x1", "kxk", "linear", "gemv")}
        base_fit = ([], [])  # rows [copied floats, fetched bytes, outputs], times with no kept block
        mac_fit = {k: ([], []) for k in ("1x1", "kxk", "gemv")}
        by_density = {d: [0.0, 0.0] for d in DENSITIES}
        specs = [LayerSpec.conv("c", ci, co, k, hw, stride=s) for ci, co, k, hw, s in CONV_CASES]
        specs += [LayerSpec.linear("l", i, o, t) for i, o, t in LINEAR_CASES]
        cases = []
        for spec in specs:
            if spec.kind == "conv":
                x = torch.randn(1, spec.ci, spec.h_in, spec.w_in, generator=g)
                w = torch.randn(spec.co, spec.ci, spec.kh, spec.kw, generator=g)
                fns = [lambda x=x, w=w, s=spec: F.conv2d(x, w, None, s.stride, s.padding)]
            else:
                x = torch.randn(spec.w_in, spec.ci, generator=g)
                w = torch.randn(spec.co, spec.ci, generator=g)
                fns = [lambda x=x, w=w: F.linear(x, w)]
            mats = [BlockSparseMatrix.from_weight(_masked(w, d, g)) for d in (0.0,) + DENSITIES]
            for mat in mats:
                if spec.kind == "conv":
                    fns.append(lambda x=x, m=mat, s=spec: block_sparse_conv2d(x, m, (s.kh, s.kw), None, s.stride,
                                                                               s.padding, backend=use))
                else:
                    fns.append(lambda x=x, m=mat: block_sparse_linear(x, m, None, backend=use))
            cases.append((spec, mats, fns, [[] for _ in fns]))
        # Several passes over all cases, so a burst of load from other processes hits few samples of each.
        for _ in range(passes):
            for spec, mats, fns, samples in cases:
                for acc, got in zip(samples, timer(fns)):
                    acc.extend(got if isinstance(got, list) else [got])
        for spec, mats, fns, samples in cases:
            kind = cpu_kind(spec)
            times = [statistics.median(v) for v in samples]
            td, t0, ts = times[0], times[1], times[2:]
            wbytes = spec.weight_numel * 4
            rows = spec.w_out if kind == "gemv" else 1
            dense_fit[kind][0].append([spec.macs, wbytes * rows] + (
                [wbytes if wbytes > cache["llc_kib"] * 1024 else 0] if kind == "gemv" else []))
            dense_fit[kind][1].append(td - d_ovh)
            for d, mat, t in zip(DENSITIES, mats[1:], ts):
                work = kernel_work(spec, mat.nnzb // (spec.kh * spec.kw), cache)
                if kind == "gemv":
                    mac_fit["gemv"][0].append([work["macs"], work["weight_bytes"], work["llc_miss_bytes"]])
                    mac_fit["gemv"][1].append(t - s_ovh)
                else:
                    mk = "1x1" if kind in ("1x1", "linear") else "kxk"
                    mac_fit[mk][0].append([work["lane_macs"], work["block_visits"], work["l2_miss_bytes"]])
                    mac_fit[mk][1].append(t - t0)
                by_density[d][0] += work["macs"]
                by_density[d][1] += t
            if kind != "gemv":
                work = kernel_work(spec, 0)
                extra = spec.ci * spec.w_out * 8 / (bw * 1e9) if spec.kind == "linear" else 0.0
                base_fit[0].append([work["copy_floats"], work["fetch_bytes"], work["out_floats"]])
                base_fit[1].append(t0 - s_ovh - extra)
            log(f"{spec.describe():30s} dense {td * 1e3:8.3f} ms | no block {t0 * 1e3:7.3f} | " + " | ".join(
                f"{d:.0%} {t * 1e3:7.3f}" for d, t in zip(DENSITIES, ts)) + " ms")
        dense = {"overhead_us": round(d_ovh * 1e6, 2)}
        for kind, key in (("1x1", "conv1x1"), ("kxk", "convkxk"), ("linear", "linear"), ("gemv", "gemv")):
            coefs = _nnls(*dense_fit[kind]) if dense_fit[kind][1] else [0.0, 0.0, 0.0]
            dense[f"{key}_gmacs"] = _rate(coefs[0], 50.0)
            dense[f"{key}_weight_gbps"] = _rate(coefs[1], 1000.0)
            if kind == "gemv":
                dense["gemv_dram_gbps"] = _rate(coefs[2] if len(coefs) > 2 else 0.0, 1000.0)
        sparse = {"backend": use, "overhead_us": round(s_ovh * 1e6, 2)}
        c_copy, c_fetch, c_out = _nnls(base_fit[0], base_fit[1])
        sparse.update(copy_gfloats=_rate(c_copy, 5.0), fetch_gbps=_rate(c_fetch, 1000.0), store_gfloats=_rate(c_out, 5.0))
        misses = []
        for kind in ("1x1", "kxk"):
            c_m, c_b, c_l2 = _nnls(*mac_fit[kind]) if mac_fit[kind][1] else (0.0, 0.0, 0.0)
            sparse[f"gmacs_{kind}"] = _rate(c_m, 100.0)
            sparse[f"gblocks_{kind}"] = _rate(c_b, 1000.0)
            if any(r[2] for r in mac_fit[kind][0]):
                misses.append(c_l2)
        sparse["l2_miss_gbps"] = _rate(max(misses) if misses else 0.0, 1000.0)
        c_m, c_w, c_dram = _nnls(*mac_fit["gemv"]) if mac_fit["gemv"][1] else (0.0, 0.0, 0.0)
        sparse["gemv_gmacs"] = _rate(c_m, 50.0)
        sparse["gemv_weight_gbps"] = _rate(c_w, 1000.0)
        sparse["gemv_dram_gbps"] = _rate(c_dram, 1000.0)
        profile = {
            "name": "cpu", "kind": "cpu",
            "description": "this machine's CPU running nmsparse's block-sparse kernels (calibrate_cpu)",
            "machine": machine_info(threads=False), "threads": threads,
            "measured": datetime.datetime.now().strftime("%Y-%m-%d %H:%M") + (" (quick)" if quick else ""),
            "block": [8, 8],
            "memory_gbps": round(bw, 2),
            "cache": cache,
            "dense": dense,
            "sparse": sparse,
            "sparse_gmacs_by_density": {d: round(v[0] / v[1] / 1e9, 2) if v[1] else 1.0 for d, v in by_density.items()},
            "dense_gemm_gflops": round(gemm_gflops, 2),
        }
        # How well the fitted model reproduces the calibration measurements themselves.
        errs = {"dense": [], "sparse": []}
        for spec, mats, fns, samples in cases:
            times = [statistics.median(v) for v in samples]
            e_d = cpu_dense_time(spec, profile) / times[0] - 1
            errs["dense"].append(abs(e_d))
            parts = [f"dense {e_d:+.0%}"]
            for d, mat, t in zip(DENSITIES, mats[1:], times[2:]):
                e = cpu_sparse_time(spec, mat.nnzb // (spec.kh * spec.kw), profile) / t - 1
                errs["sparse"].append(abs(e))
                parts.append(f"{d:.0%} {e:+.0%}")
            log(f"  fit {spec.describe():30s} " + ", ".join(parts))
        profile["fit_error_median"] = {k: round(float(statistics.median(v)), 3) for k, v in errs.items()}
        profile["fit_error_max"] = {k: round(float(max(v)), 3) for k, v in errs.items()}
        log(f"dense {profile['dense']}\nsparse {profile['sparse']}\nfit error median {profile['fit_error_median']}, "
            f"max {profile['fit_error_max']}")
    finally:
        torch.set_num_threads(old)
    if path is not None:
        write_profile(profile, path)
    return profile


HEADER = """# The cpu target: this package's kernels on a measured CPU (written by nmsparse.compile.calibrate_cpu).
# Dense layers (PyTorch F.conv2d / F.linear), per kind (1x1 conv, larger kernel, Linear on 8+ rows,
#   Linear on fewer rows = gemv): time = overhead + MACs / <kind>_gmacs + weight bytes / <kind>_weight_gbps
#   (PyTorch re-lays out the weights at each call; for gemv the weight term counts once per row).
# Block-sparse layers (sparse.backend kernel), per kind (1x1 = plain 1x1 conv reading x, kxk = the others):
#   time = overhead + padded phase-plane floats / copy_gfloats + prefetched input bytes / fetch_gbps
#        + outputs / store_gfloats + lane MACs / gmacs_<kind> + (kept block, output chunk) visits / gblocks_<kind>,
#   lane MACs counting the 16-wide vector lanes the kernel computes (on the padded grid, rounded up);
#        + kept weight bytes x chunks / l2_miss_gbps when the kept weights exceed the L2 cache (cache.l2_kib);
#   a Linear on fewer than 8 rows: overhead + rows x kept MACs / gemv_gmacs + kept bytes / gemv_weight_gbps
#        (+ kept bytes / gemv_dram_gbps beyond the last-level cache, cache.llc_kib; likewise dense gemv).
# Coefficients come from non-negative least squares over the measured cases.
# Rates are G per second (gmacs: 1e9 multiply-accumulates/s; gfloats: 1e9 floats/s; gbps: 1e9 bytes/s).
# Re-measure on your machine: python -c "from nmsparse.compile import calibrate_cpu; calibrate_cpu('cpu.yaml')"
"""


def write_profile(profile: dict, path) -> None:
    path = os.fspath(path)
    text = HEADER + yaml.safe_dump(profile, sort_keys=False, default_flow_style=False)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cache_sizes() -> dict:
    """{"l2_kib", "llc_kib"} of CPU 0 from sysfs (defaults 1024 and 32768 where unreadable)."""
    out = dict(DEFAULT_CACHE)
    base = "/sys/devices/system/cpu/cpu0/cache"
    levels = {}
    try:
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            with open(f"{base}/{entry}/level") as f:
                level = int(f.read())
            with open(f"{base}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{entry}/size") as f:
                size = f.read().strip()
            if kind in ("Unified", "Data") and size.endswith("K"):
                levels[level] = int(size[:-1])
    except (OSError, ValueError):
        return out
    if 2 in levels:
        out["l2_kib"] = levels[2]
    if levels:
        out["llc_kib"] = levels[max(levels)]
    return out

