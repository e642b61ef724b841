"""`nmsparse bench gpu`, GEMMs: dense vs 2:4 products for ViT-B, ViT-L and GPT-2 XL MLP shapes at
8k-32k tokens: forward with 2:4 weights, backward-data with transposable 2:4 weights, SDGP's
input gradient by the separate (our prune + compress) and fused (tile op) routes, with and
without the prune/compress overhead, each sparse product checked against the dense one first. "vs dense" is
the dense product of the same op (for SDGP dX: the dense backward-data product it replaces)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels import ops
from ..kernels import semi_structured as ss
from .gpu_env import Timer, err_text, fmt_ms, fmt_x, rel_err, rotation
from ..common.text import markdown_table

__all__ = ["GEMM_SHAPES", "transposable_pattern", "bench_gemm", "gemm_table"]

GEMM_SHAPES = [("ViT-B", 768, 3072), ("ViT-L", 1024, 4096), ("GPT-2 XL", 1600, 6400)]


def transposable_pattern(rows: int, cols: int, device, dtype=torch.bool) -> torch.Tensor:
    """A fixed transposable 2:4 mask (every 4x4 tile = two 2x2 blocks on its diagonal): the
    sparsity structure is all that matters for speed."""
    tile = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=dtype)
    return tile.repeat(rows // 4, cols // 4).to(device)


@dataclass
class _Case:
    op: str
    route: str
    fn: Callable[[int], torch.Tensor]
    check: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None


def bench_gemm(device, timer: Timer, quick: bool, log) -> list[dict]:
    from ..kernels import triton_prune as tp

    dtype = torch.bfloat16
    rows = []
    shapes = GEMM_SHAPES[:1] if quick else GEMM_SHAPES
    tokens_list = [8192] if quick else [8192, 16384, 32768]
    if device.type != "cuda":
        shapes, tokens_list = [("tiny", 64, 128)], [128]
    for model, d, hidden in shapes:
        for layer, (k_in, n_out) in (("fc1", (d, hidden)), ("fc2", (hidden, d))):
            for tokens in tokens_list:
                torch.manual_seed(0)
                w = torch.randn(n_out, k_in, device=device, dtype=dtype) / math.sqrt(k_in)
                mask = transposable_pattern(n_out, k_in, device)
                wm = w * mask
                rot = rotation(tokens * max(k_in, n_out) * 2)
                xs = [torch.randn(tokens, k_in, device=device, dtype=dtype) for _ in range(rot)]
                gys = [torch.randn(tokens, n_out, device=device, dtype=dtype) for _ in range(rot)]
                flops = 2 * tokens * k_in * n_out
                cases: list[_Case] = [
                    _Case("forward", "dense", lambda i: F.linear(xs[i % rot], w)),
                    _Case("backward-data", "dense", lambda i: gys[i % rot] @ w),
                ]
                try:
                    ws = ss.to_sparse_24(wm)
                    wts = ss.to_sparse_24(wm.t().contiguous())
                    cases += [
                        _Case("forward", "2:4 W (compressed)", lambda i: F.linear(xs[i % rot], ws),
                              lambda: (F.linear(xs[0], ws), F.linear(xs[0], wm))),
                        _Case("forward", "2:4 W + compress", lambda i: F.linear(xs[i % rot], ss.to_sparse_24(wm))),
                        _Case("backward-data", "2:4-T W (compressed)", lambda i: F.linear(gys[i % rot], wts),
                              lambda: (F.linear(gys[0], wts), gys[0] @ wm)),
                        _Case("backward-data", "2:4-T W + compress",
                              lambda i: F.linear(gys[i % rot], ss.to_sparse_24(wm.t().contiguous()))),
                    ]
                except Exception as e:
                    rows.append({"model": model, "layer": layer, "tokens": tokens, "op": "2:4 weights",
                                 "route": "-", "check": err_text(e)})
                # SDGP's input gradient
                try:
                    pruned = [tp.prune(g, 2, 4, "magnitude", -1) for g in gys]
                    pcs = [ss.to_sparse_24(p) for p in pruned]
                    cases += [
                        _Case("SDGP dX", "prune + dense GEMM",
                              lambda i: tp.prune(gys[i % rot], 2, 4, "magnitude", -1) @ w),
                        _Case("SDGP dX", "2:4 GEMM only (dY compressed)", lambda i: pcs[i % rot] @ w,
                              lambda: (pcs[0] @ w, pruned[0] @ w)),
                        _Case("SDGP dX", "separate: prune + compress + 2:4 GEMM",
                              lambda i: ss.sdgp_dx_separate(gys[i % rot], w, "magnitude"),
                              lambda: (ss.sdgp_dx_separate(gys[0], w, "magnitude"), pruned[0] @ w)),
                        _Case("SDGP dX", "separate, rescale",
                              lambda i: ss.sdgp_dx_separate(gys[i % rot], w, "rescale")),
                    ]
                except Exception as e:
                    rows.append({"model": model, "layer": layer, "tokens": tokens, "op": "SDGP dX",
                                 "route": "separate", "check": err_text(e)})
                try:
                    tile = ss.prune_tile24(gys[0])
                    cases += [
                        _Case("SDGP dX", "fused tile24: tile prune+compress + 2:4 GEMM",
                              lambda i: ss.sdgp_dx_tile24(gys[i % rot], w),
                              lambda: (tile @ w, ops.tile24_prune_grad(gys[0]) @ w)),
                    ]
                except Exception as e:
                    rows.append({"model": model, "layer": layer, "tokens": tokens, "op": "SDGP dX",
                                 "route": "fused tile24", "check": err_text(e)})
                dense_t = {}
                for c in cases:
                    row = {"model": model, "layer": layer, "tokens": tokens, "op": c.op, "route": c.route,
                           "mnk": f"{tokens}x{k_in if c.op == 'forward' else n_out}x"
                                  f"{n_out if c.op == 'forward' else k_in}"}
                    try:
                        if c.check is not None:
                            got, exp = c.check()
                            err = rel_err(got, exp)
                            row["rel_err"] = err
                            row["check"] = "ok" if err < 2e-2 else f"MISMATCH {err:.2g}"
                        else:
                            row["check"] = "ok"
                        t = timer(c.fn)
                        row["s"], row["tflops"] = t, flops / t / 1e12
                        if c.route == "dense":
                            dense_t[c.op] = t
                        # SDGP's dX replaces the dense backward-data product dY @ W: that is its baseline
                        base = dense_t.get("backward-data" if c.op == "SDGP dX" else c.op)
                        row["speedup"] = base / t if base else None
                    except Exception as e:
                        row["check"] = err_text(e)
                    rows.append(row)
                del xs, gys
    return rows


def gemm_table(rows) -> str:
    return markdown_table(
        ["model", "layer", "tokens", "op", "route", "check", "ms", "TFLOP/s (dense-equiv.)", "vs dense"],
        [[r["model"], r["layer"], r["tokens"], r["op"], r["route"], r.get("check", "-"), fmt_ms(r.get("s")),
          fmt_x(r.get("tflops"), 1), fmt_x(r.get("speedup"))] for r in rows])
