"""Where the 2:4 products and the prune kernels lose time on a GPU: two measurements `bench gpu` does not make.

1. cuSPARSELt per call: for a dense-vs-2:4 product (weight already compressed), the CUDA-event time of single
   calls (what `bench gpu` reports), the host time to issue one call, and the time per product when 20 calls are
   captured in a CUDA graph and replayed (no host work: the kernels alone); plus torch's algorithm search.
2. The Triton prune kernels' launch shape: GB/s of 2:4 / 4:8 magnitude pruning (last dim and NCHW channels) for
   tiles of 2048-8192 elements and 4 or 8 warps.

Usage (on a GPU machine): python scripts/gpu_probe.py OUT_DIR   -> OUT_DIR/gpu-probe.json and .md
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nmsparse.common.text import markdown_table
from nmsparse.kernels import semi_structured as ss
from nmsparse.kernels import triton_prune as tp


def events(fn, reps=20, warmup=3) -> float:
    """Median seconds of single calls timed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def host(fn, reps=20) -> float:
    """Seconds of host time to issue one call, the GPU kept busy by ~30 ms of matmuls queued first: a call
    that synchronizes shows up as >= 1.4 ms here."""
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for _ in range(20):
        big @ big
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    return t


def graphed(fn, calls=20) -> float | None:
    """Seconds per call when `calls` calls are captured in one CUDA graph and replayed (None if capture fails)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        return events(g.replay, reps=10) / calls
    except Exception as e:  # report, keep going
        print(f"graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def cslt_rows() -> list[dict]:
    rows = []
    for name, tokens, k, n in [("ViT-L fc1", 16384, 1024, 4096), ("ViT-L fc2", 16384, 4096, 1024),
                               ("GPT-2 XL fc1", 32768, 1600, 6400), ("square 8192", 8192, 8192, 8192)]:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device="cuda").repeat(n, k // 4)
        wm = w * mask
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        ws = ss.to_sparse_24(wm)
        packed = ss.cslt_compress(wm)
        cases = {"dense F.linear": lambda: F.linear(x, wm),
                 "2:4 F.linear (SparseSemiStructuredTensor)": lambda: F.linear(x, ws),
                 "2:4 torch._cslt_sparse_mm": lambda: torch._cslt_sparse_mm(packed, x.t()),
                 "compress (to_sparse_24)": lambda: ss.to_sparse_24(wm)}
        try:
            alg = torch._cslt_sparse_mm_search(packed, x.t())
            cases[f"2:4 _cslt_sparse_mm, searched alg {alg}"] = lambda: torch._cslt_sparse_mm(packed, x.t(),
                                                                                             alg_id=alg)
        except Exception as e:
            print(f"{name}: _cslt_sparse_mm_search failed: {type(e).__name__}: {str(e)[:200]}")
        err = float((F.linear(x, ws).float() - F.linear(x, wm).float()).norm() / F.linear(x, wm).float().norm())
        dense = None
        for label, fn in cases.items():
            row = {"shape": name, "mnk": f"{tokens}x{k}x{n}", "call": label, "rel_err": err}
            row["event_s"] = events(fn)
            row["host_s"] = host(fn)
            row["graph_s"] = graphed(fn)
            if label.startswith("dense"):
                dense = row
            row["event_x"] = dense["event_s"] / row["event_s"]
            row["graph_x"] = (dense["graph_s"] / row["graph_s"]) if dense["graph_s"] and row["graph_s"] else None
            rows.append(row)
            print(row, flush=True)
    return rows


def prune_rows(copy_gbs: float) -> list[dict]:
    rows = []
    old = tp._TILE_ELEMS, tp._NUM_WARPS
    cases = [("lastdim", (32768, 3072), -1, 4), ("lastdim", (32768, 3072), -1, 8), ("nchw", (128, 256, 56, 56), 1, 4)]
    try:
        for layout, shape, dim, m in cases:
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            xs = [x, x.clone()]
            nbytes = x.numel() * x.element_size()
            for tile in (2048, 4096, 8192):
                for warps in (4, 8):
                    tp._TILE_ELEMS, tp._NUM_WARPS = tile, warps
                    i = iter(range(10**9))
                    t = events(lambda: tp.prune(xs[next(i) % 2], m // 2, m, "magnitude", dim))
                    rows.append({"layout": layout, "shape": "x".join(map(str, shape)), "nm": f"{m // 2}:{m}",
                                 "tile": tile, "warps": warps, "s": t, "gbs": 2 * nbytes / t / 1e9,
                                 "of_copy": 2 * nbytes / t / 1e9 / copy_gbs})
                    print(rows[-1], flush=True)
    finally:
        tp._TILE_ELEMS, tp._NUM_WARPS = old
    return rows


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() * 2 / events(lambda: y.copy_(x)) / 1e9
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cusparselt": torch.backends.cusparselt.version(), "copy_gbs": copy_gbs}
    res["cslt"] = cslt_rows()
    (out / "gpu-probe.json").write_text(json.dumps(res, indent=1))
    res["prune"] = prune_rows(copy_gbs)
    (out / "gpu-probe.json").write_text(json.dumps(res, indent=1))

    def ms(v):
        return "-" if v is None else f"{v * 1e3:.3f}"

    def x2(v):
        return "-" if v is None else f"{v:.2f}"

    md = [f"# gpu probe: {res['gpu']}, torch {res['torch']}, cuSPARSELt {res['cusparselt']}, "
          f"copy {copy_gbs:.0f} GB/s", "", "## cuSPARSELt per call", "",
          markdown_table(["shape", "m x k x n", "call", "event ms", "host ms / call", "graph ms / call",
                          "vs dense (events)", "vs dense (graph)"],
                         [[r["shape"], r["mnk"], r["call"], ms(r["event_s"]), ms(r["host_s"]), ms(r["graph_s"]),
                           x2(r["event_x"]), x2(r["graph_x"])] for r in res["cslt"]]),
          "", "## prune kernel launch shape (magnitude, bf16)", "",
          markdown_table(["layout", "shape", "n:m", "tile elems", "warps", "ms", "GB/s", "of copy"],
                         [[r["layout"], r["shape"], r["nm"], r["tile"], r["warps"], ms(r["s"]), f"{r['gbs']:.0f}",
                           x2(r["of_copy"])] for r in res["prune"]])]
    (out / "gpu-probe.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-results"))
