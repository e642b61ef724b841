"""`nmsparse bench gpu`, shared parts: the timer, formatting, the machine, and the roofs (copy
bandwidth for the pruning kernels, the dense bf16 matmul rate)."""

from __future__ import annotations

import math
import platform
import statistics
import time
from typing import Callable

import torch

from ..kernels import semi_structured as ss
from ..common.system import machine_info
from ..common.text import markdown_table

__all__ = ["Timer", "rotation", "rel_err", "fmt_ms", "fmt_x", "err_text", "environment", "bench_roofs",
           "roofs_table"]


class Timer:
    """Median seconds of fn(i) (i = repeat index, to rotate inputs): CUDA events on a GPU,
    perf_counter elsewhere (dry runs)."""

    def __init__(self, device: torch.device, warmup: int = 3, reps: int = 20):
        self.device, self.warmup, self.reps = device, warmup, reps

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[int], object], reps: int | None = None) -> float:
        reps = reps or self.reps
        for i in range(self.warmup):
            fn(i)
        self._sync()
        times = []
        for i in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(i)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def rotation(nbytes: int) -> int:
    """How many input copies to cycle through so that repeats do not hit a warm L2 (~50-100 MB)."""
    return 1 if nbytes >= 256 << 20 else min(8, max(2, math.ceil((256 << 20) / max(nbytes, 1))))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def fmt_ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.3f}"


def fmt_x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def environment(device: torch.device) -> dict:
    """Library versions, the machine, and the GPU with its 2:4 sparse-core status."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "machine": machine_info()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        from ..common import __version__

        env["nmsparse"] = __version__
    except Exception:
        env["nmsparse"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
        env["cusparselt"] = (torch.backends.cusparselt.version()
                             if torch.backends.cusparselt.is_available() else None)
        env["sparse_cores"] = ss.availability(device)[1] or "available"
    else:
        env.update(gpu=None, cusparselt=None, sparse_cores=ss.availability()[1])
    return env


def bench_roofs(device, timer: Timer, quick: bool) -> dict:
    """Copy bandwidth (the roof for the pruning kernels) and the dense bf16 matmul rate."""
    nbytes = (256 << 20) if quick else (1 << 30)
    if device.type != "cuda":
        nbytes = 8 << 20
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    t = timer(lambda i: y.copy_(x))
    copy_gbs = 2 * nbytes / t / 1e9
    n = 4096 if quick else 8192
    if device.type != "cuda":
        n = 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    tm = timer(lambda i: a @ b)
    del x, y
    return {"copy_bytes": nbytes, "copy_s": t, "copy_gbs": copy_gbs, "matmul_n": n, "matmul_s": tm,
            "matmul_tflops": 2 * n**3 / tm / 1e12}


def roofs_table(r: dict) -> str:
    return markdown_table(["copy GB/s", "bf16 matmul TFLOP/s", "matmul n"],
                          [[f"{r['copy_gbs']:.0f}", f"{r['matmul_tflops']:.0f}", r["matmul_n"]]])
