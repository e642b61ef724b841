"""`nmsparse bench gpu`, pruning kernels: every Triton pruning kernel (lastdim and NCHW-channel
layouts, magnitude / random / rescale, m in 4, 8, 16, 32; SR-STE masking) in GB/s and as a
fraction of copy bandwidth, against the torch implementation, each checked against the reference
first."""

from __future__ import annotations

import torch

from ..kernels import reference as ref
from .gpu_env import Timer, err_text, fmt_ms, fmt_x, rel_err, rotation
from ..common.text import markdown_table

__all__ = ["PRUNE_METHODS", "bench_prune", "prune_table"]

PRUNE_METHODS = ("magnitude", "random", "rescale")


def _prune_inputs(layout: str, device, quick: bool, dtype):
    if device.type != "cuda":
        shape = (64, 256) if layout == "lastdim" else (2, 64, 4, 4)
    elif layout == "lastdim":
        shape = (8192 if quick else 32768, 3072)
    else:
        shape = (32 if quick else 128, 256, 56, 56)
    dim = -1 if layout == "lastdim" else 1
    x = torch.randn(shape, device=device, dtype=dtype)
    return x, dim


def _check_prune(x, n, m, method, dim) -> str:
    from ..kernels import triton_prune as tp

    out, mask = tp.prune(x, n, m, method, dim, seed=7, return_mask=True)
    if not bool((mask.movedim(dim, -1).reshape(-1, m).sum(-1) == n).all()):
        return "MISMATCH: not exactly n per group"
    if method == "random":  # the Philox stream vs its numpy emulation, on the first sample / row
        part = x[:1]
        got = tp.prune(part, n, m, method, dim, seed=7).cpu()
        exp = ref.prune_random_reference(part.cpu(), n, m, dim, seed=7)
        return "ok" if torch.equal(got != 0, exp != 0) else "MISMATCH vs Philox reference"
    exp = ref.prune_reference(x, n, m, method, dim)
    if method == "magnitude":
        return "ok" if torch.equal(out, exp) else "MISMATCH vs reference"
    err = rel_err(out, exp)
    return "ok" if err < 1e-3 else f"MISMATCH: rel err {err:.2g}"


def bench_prune(device, timer: Timer, quick: bool, copy_gbs: float | None, log) -> list[dict]:
    from ..kernels import triton_prune as tp

    rows = []
    dtype = torch.bfloat16
    ms = (4, 16) if quick else (4, 8, 16, 32)
    if device.type != "cuda":
        ms = (4,)
    for layout in ("lastdim", "nchw"):
        x, dim = _prune_inputs(layout, device, quick, dtype)
        nbytes = x.numel() * x.element_size()
        xs = [x] + [x.clone() for _ in range(rotation(nbytes) - 1)]
        for method in PRUNE_METHODS:
            for m in ms:
                n = m // 2
                row = {"layout": layout, "shape": "x".join(map(str, x.shape)), "method": method,
                       "nm": f"{n}:{m}", "dtype": str(dtype).replace("torch.", "")}
                try:
                    row["check"] = _check_prune(x, n, m, method, dim)
                    t = timer(lambda i: tp.prune(xs[i % len(xs)], n, m, method, dim, seed=i))
                    row["triton_s"] = t
                    row["gbs"] = 2 * nbytes / t / 1e9  # read x + write the result
                    row["of_copy"] = row["gbs"] / copy_gbs if copy_gbs else None
                    gen = torch.Generator(device=device).manual_seed(0)
                    tt = timer(lambda i: ref.prune_reference(xs[i % len(xs)], n, m, method, dim, gen),
                               reps=5)
                    row["torch_s"] = tt
                    row["speedup"] = tt / t
                except Exception as e:
                    row["check"] = err_text(e)
                rows.append(row)
        del x, xs
    # SR-STE masking of weights
    for shape in ([(3072, 768), (4096, 4096), (256, 256, 3, 3)] if device.type == "cuda" else [(64, 64)]):
        w = torch.randn(shape, device=device, dtype=dtype)
        row = {"layout": "srste", "shape": "x".join(map(str, shape)), "method": "srste W*mask",
               "nm": "2:4", "dtype": "bfloat16"}
        try:
            out, mask = tp.srste_mask_apply(w, 2, 4)
            eo, em = ref.srste_reference(w, 2, 4)
            row["check"] = "ok" if torch.equal(mask, em) and torch.equal(out, eo) else "MISMATCH"
            nbytes = w.numel() * w.element_size()
            t = timer(lambda i: tp.srste_mask_apply(w, 2, 4))
            row.update(triton_s=t, gbs=(2 * nbytes + w.numel()) / t / 1e9)  # + the bool mask
            row["of_copy"] = row["gbs"] / copy_gbs if copy_gbs else None
            tt = timer(lambda i: ref.srste_reference(w, 2, 4), reps=5)
            row.update(torch_s=tt, speedup=tt / t)
        except Exception as e:
            row["check"] = err_text(e)
        rows.append(row)
    return rows


def prune_table(rows) -> str:
    return markdown_table(
        ["layout", "shape", "method", "n:m", "check", "Triton ms", "GB/s", "of copy", "torch ms", "speed-up"],
        [[r["layout"], r["shape"], r["method"], r["nm"], r.get("check", "-"), fmt_ms(r.get("triton_s")),
          fmt_x(r.get("gbs"), 0), fmt_x(r.get("of_copy")), fmt_ms(r.get("torch_s")), fmt_x(r.get("speedup"))]
         for r in rows])
