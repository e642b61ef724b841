"""`nmsparse bench prune`: N:M pruning on the CPU, the compiled one-pass kernel against the torch path.

In one run, taking turns call by call so a change in the machine's load hits both alike: SDGP's
gradient pruning (``kernels.native_prune.prune_grad_native`` vs ``kernels.reference.prune_checked``,
the torch path it replaces) for every method on the output gradient of a ResNet-18 layer-1
convolution (NCHW) and of a GPT MLP (batch x tokens x features), and the SR-STE weight mask
(``nm_mask_native`` vs ``patterns.nm_mask``) on a ResNet-18 layer-4 weight and a GPT MLP weight.
Medians of wall time and of the process's CPU time (a loaded machine stretches the first), in
ns per element, the ratio torch / native, and beside them one dense product of the same layer
(the convolution's or matmul's forward) for scale. Every native result is checked against the
torch path's (equal, or for rescale to the rounding) before timing.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from ..common.system import machine_info
from ..common.text import markdown_table
from ..kernels.native_prune import native_prune_available, native_prune_error, nm_mask_native, prune_grad_native
from ..kernels.reference import PRUNE_METHODS, prune_checked
from ..patterns.nm import nm_mask

GRADS = {  # name: (shape, channel dim, the dense product of the layer, for scale)
    "conv grad 32x64x32x32": ((32, 64, 32, 32), 1, "conv 64->64 3x3"),
    "linear grad 12x64x1024": ((12, 64, 1024), 2, "matmul (768x1024)@(1024x256)"),
}
WEIGHTS = {"conv weight 512x512x3x3": (512, 512, 3, 3), "linear weight 1024x256": (1024, 256)}
QUICK_GRADS = {"conv grad 4x16x8x8": ((4, 16, 8, 8), 1, "conv 16->16 3x3"),
               "linear grad 2x8x64": ((2, 8, 64), 2, "matmul (16x64)@(64x256)")}
QUICK_WEIGHTS = {"conv weight 32x32x3x3": (32, 32, 3, 3), "linear weight 64x32": (64, 32)}
METHODS = tuple(m for m in PRUNE_METHODS)


def _turns(fns: dict, repeats: int) -> dict:
    """{name: (median wall s, median CPU s)}: the functions take turns, one call each per round, after a warm-up round."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def _product(shape, what: str):
    if what.startswith("conv"):
        x, w = torch.randn(shape), torch.randn(shape[1], shape[1], 3, 3)
        return lambda: F.conv2d(x, w, padding=1)
    x, w = torch.randn(shape[0] * shape[1], shape[2]), torch.randn(shape[2], 256)
    return lambda: x @ w


def _check(ref: torch.Tensor, out: torch.Tensor, method: str, where: str) -> None:
    same = torch.equal(ref, out) if method != "rescale" else torch.allclose(ref, out, rtol=1e-5, atol=1e-7)
    if not same:
        raise AssertionError(f"the native kernel disagrees with the torch path: {method} on {where}")


def run(n: int = 2, m: int = 4, repeats: int = 9, threads: int = 1, seed: int = 0, quick: bool = False) -> dict:
    """Time every case (``quick``: small shapes); returns {"machine", "note", "tables": {title: markdown}, "rows"}."""
    grads, weights = (QUICK_GRADS, QUICK_WEIGHTS) if quick else (GRADS, WEIGHTS)
    if not native_prune_available():
        raise RuntimeError(f"the compiled kernel is unavailable here: {native_prune_error()}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        rows, grad_rows, mask_rows = [], [], []
        for where, (shape, d, what) in grads.items():
            g = torch.randn(shape)
            numel = g.numel()
            fns = {"product": _product(shape, what)}
            for method in METHODS:
                gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731 - the same draws for both paths
                _check(prune_checked(g, n, m, method, d, gen(), 1e-4), prune_grad_native(g, n, m, method, d, gen()),
                       method, where)
                fns[f"torch {method}"] = lambda method=method: prune_checked(g, n, m, method, d, gen(), 1e-4)
                fns[f"native {method}"] = lambda method=method: prune_grad_native(g, n, m, method, d, gen())
            t = _turns(fns, repeats)
            for method in METHODS:
                tt, tn = t[f"torch {method}"], t[f"native {method}"]
                row = {"case": where, "method": method, "torch_ns": tt[1] / numel * 1e9, "native_ns": tn[1] / numel * 1e9,
                       "torch_ms": tt[0] * 1e3, "native_ms": tn[0] * 1e3, "speedup_cpu": tt[1] / tn[1],
                       "native_vs_product": tn[1] / t["product"][1], "product": what, "product_ms": t["product"][0] * 1e3}
                rows.append(row)
                grad_rows.append([where, method, f"{row['torch_ms']:.2f}", f"{row['native_ms']:.2f}",
                                  f"{row['torch_ns']:.2f}", f"{row['native_ns']:.2f}", f"{row['speedup_cpu']:.1f}x",
                                  f"{row['native_vs_product']:.2f} of {what} ({row['product_ms']:.1f} ms)"])
        for where, shape in weights.items():
            w = torch.randn(shape)
            if not torch.equal(nm_mask(w, n, m, dim=1), nm_mask_native(w, n, m, 1)):
                raise AssertionError(f"the native mask disagrees with nm_mask on {where}")
            t = _turns({"torch": lambda: nm_mask(w, n, m, dim=1), "native": lambda: nm_mask_native(w, n, m, 1)}, repeats)
            mask_rows.append([where, f"{t['torch'][0] * 1e3:.2f}", f"{t['native'][0] * 1e3:.2f}",
                              f"{t['torch'][1] / w.numel() * 1e9:.2f}", f"{t['native'][1] / w.numel() * 1e9:.2f}",
                              f"{t['torch'][1] / t['native'][1]:.1f}x"])
            rows.append({"case": where, "method": "nm_mask", "torch_ms": t["torch"][0] * 1e3,
                         "native_ms": t["native"][0] * 1e3, "speedup_cpu": t["torch"][1] / t["native"][1]})
    finally:
        torch.set_num_threads(old)
    try:
        load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    head = ["case", "method", "torch ms", "native ms", "torch ns/el (CPU)", "native ns/el (CPU)", "speed-up (CPU time)",
            "native / dense product (CPU time)"]
    return {
        "machine": f"{machine_info()}, {threads} thread(s), {load} at the end",
        "note": f"{n}:{m}; medians of {repeats} calls taking turns; ns/el from the process's CPU time",
        "tables": {f"SDGP gradient pruning ({n}:{m})": markdown_table(head, grad_rows),
                   f"SR-STE weight mask ({n}:{m})": markdown_table(
                       ["weight", "torch ms", "native ms", "torch ns/el (CPU)", "native ns/el (CPU)",
                        "speed-up (CPU time)"], mask_rows)},
        "rows": rows,
    }
