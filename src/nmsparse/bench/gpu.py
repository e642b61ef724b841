"""`nmsparse bench gpu`: what the Triton kernels and 2:4 sparse tensor cores buy on this GPU.

``run(out=None, quick=False)`` measures, printing a Markdown table after each part:

1. the machine: GPU, torch, CUDA, cuSPARSELt, triton versions;
2. copy bandwidth (the roof for the pruning kernels) and the dense bf16 matmul rate;
3. every Triton pruning kernel (lastdim and NCHW-channel layouts, magnitude / random / rescale,
   m in 4, 8, 16, 32; SR-STE masking) in GB/s and as a fraction of copy bandwidth, against the
   torch implementation, each checked against the reference first;
4. dense vs 2:4 GEMMs for ViT-B, ViT-L and GPT-2 XL MLP shapes at 8k-32k tokens: forward
   with 2:4 weights, backward-data with transposable 2:4 weights, SDGP's input gradient by the
   separate (our prune + compress) and fused (tile op) routes, with and without the
   prune/compress overhead, each sparse product checked against the dense one first;
5. forward + backward of one transformer MLP block (ViT-B widths);
6. whole training steps (bf16 weights, SGD) of vit_tiny, a ViT-B/16 and ResNet-50
   (channels_last): dense vs SDGP 2:4 vs transposable 2:4 weights vs both.

Times are medians of CUDA-event timings with rotating inputs. Results go to `out` (a .json path,
with a .md beside it, or a directory) with the GPU name and library versions. Without CUDA,
``run`` exits (SystemExit) with a message saying so.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops
from ..kernels import reference as ref
from ..kernels import semi_structured as ss
from .timing import machine_info, markdown_table

__all__ = ["run", "NO_CUDA_MESSAGE", "GEMM_SHAPES"]

NO_CUDA_MESSAGE = ("nmsparse bench gpu needs a CUDA GPU (2:4 sparse tensor cores: sm80 or newer) and "
                   "found none (torch.cuda.is_available() is False). Run it on a GPU machine, e.g. "
                   "with scripts/gpu_check.sh.")
GEMM_SHAPES = [("ViT-B", 768, 3072), ("ViT-L", 1024, 4096), ("GPT-2 XL", 1600, 6400)]
PRUNE_METHODS = ("magnitude", "random", "rescale")


# ------------------------------------------------------------------------------------------------
# Timing

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


def _rotation(nbytes: int) -> int:
    """How many input copies to cycle through so that repeats do not hit a warm L2 (~50-100 MB)."""
    return 1 if nbytes >= 256 << 20 else min(8, max(2, math.ceil((256 << 20) / max(nbytes, 1))))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.3f}"


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# ------------------------------------------------------------------------------------------------
# Environment

def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "machine": machine_info()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        from .. import __version__

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


# ------------------------------------------------------------------------------------------------
# 1. Copy bandwidth and dense matmul rate

def bench_roofs(device, timer: Timer, quick: bool) -> dict:
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


# ------------------------------------------------------------------------------------------------
# 2. Pruning kernels

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
    err = _rel_err(out, exp)
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
        xs = [x] + [x.clone() for _ in range(_rotation(nbytes) - 1)]
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
                    row["check"] = _err_text(e)
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
            row["check"] = _err_text(e)
        rows.append(row)
    return rows


def prune_table(rows) -> str:
    return markdown_table(
        ["layout", "shape", "method", "n:m", "check", "Triton ms", "GB/s", "of copy", "torch ms", "speed-up"],
        [[r["layout"], r["shape"], r["method"], r["nm"], r.get("check", "-"), _ms(r.get("triton_s")),
          _x(r.get("gbs"), 0), _x(r.get("of_copy")), _ms(r.get("torch_s")), _x(r.get("speedup"))]
         for r in rows])


# ------------------------------------------------------------------------------------------------
# 3. GEMMs

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
                rot = _rotation(tokens * max(k_in, n_out) * 2)
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
                                 "route": "-", "check": _err_text(e)})
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
                                 "route": "separate", "check": _err_text(e)})
                try:
                    tile = ss.prune_tile24(gys[0])
                    cases += [
                        _Case("SDGP dX", "fused tile24: tile prune+compress + 2:4 GEMM",
                              lambda i: ss.sdgp_dx_tile24(gys[i % rot], w),
                              lambda: (tile @ w, ops.tile24_prune_grad(gys[0]) @ w)),
                    ]
                except Exception as e:
                    rows.append({"model": model, "layer": layer, "tokens": tokens, "op": "SDGP dX",
                                 "route": "fused tile24", "check": _err_text(e)})
                dense_t = {}
                for c in cases:
                    row = {"model": model, "layer": layer, "tokens": tokens, "op": c.op, "route": c.route,
                           "mnk": f"{tokens}x{k_in if c.op == 'forward' else n_out}x"
                                  f"{n_out if c.op == 'forward' else k_in}"}
                    try:
                        if c.check is not None:
                            got, exp = c.check()
                            err = _rel_err(got, exp)
                            row["rel_err"] = err
                            row["check"] = "ok" if err < 2e-2 else f"MISMATCH {err:.2g}"
                        else:
                            row["check"] = "ok"
                        t = timer(c.fn)
                        row["s"], row["tflops"] = t, flops / t / 1e12
                        if c.route == "dense":
                            dense_t[c.op] = t
                        base = dense_t.get(c.op)
                        row["speedup"] = base / t if base else None
                    except Exception as e:
                        row["check"] = _err_text(e)
                    rows.append(row)
                del xs, gys
    return rows


def gemm_table(rows) -> str:
    return markdown_table(
        ["model", "layer", "tokens", "op", "route", "check", "ms", "TFLOP/s (dense-equiv.)", "vs dense"],
        [[r["model"], r["layer"], r["tokens"], r["op"], r["route"], r.get("check", "-"), _ms(r.get("s")),
          _x(r.get("tflops"), 1), _x(r.get("speedup"))] for r in rows])


# ------------------------------------------------------------------------------------------------
# Sparse layers for the block and training-step benchmarks

@dataclass(frozen=True)
class Mode:
    """w24: weights masked transposable 2:4 (forward and backward-data on sparse cores);
    sdgp: None or the SDGP method for the input gradient ("rescale", "magnitude", "tile24")."""

    w24: bool = False
    sdgp: str | None = None

    @property
    def name(self) -> str:
        parts = (["2:4-T weights"] if self.w24 else []) + ([f"SDGP 2:4 {self.sdgp}"] if self.sdgp else [])
        return " + ".join(parts) or "dense"


def _prune_dy(gy2: torch.Tensor, samples: int | None, method: str) -> torch.Tensor:
    """SDGP pruning of a (rows, out) gradient with SDGP's planes: per sample over its rows
    (samples given: a 3-D Linear input or a conv's positions), else per row (2-D input)."""
    from ..kernels import triton_prune as tp

    if samples is None:
        return tp.prune(gy2, 2, 4, method, -1)
    return tp.prune(gy2.view(samples, -1, gy2.shape[1]), 2, 4, method, -1).view(gy2.shape)


class _GemmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, bias, mode: Mode, samples):
        ctx.save_for_backward(x2, w)
        ctx.mode, ctx.samples, ctx.has_bias = mode, samples, bias is not None
        if mode.w24:
            y = F.linear(x2, ss.to_sparse_24(w.detach()))
            return y + bias if bias is not None else y
        return F.linear(x2, w, bias)

    @staticmethod
    def backward(ctx, gy):
        x2, w = ctx.saved_tensors
        mode = ctx.mode
        gy = gy.contiguous()
        dw = gy.t() @ x2
        db = gy.sum(0) if ctx.has_bias else None
        if mode.sdgp == "tile24":
            dx = ss.prune_tile24(gy) @ w
        elif mode.sdgp:
            dx = ss.to_sparse_24(_prune_dy(gy, ctx.samples, mode.sdgp)) @ w
        elif mode.w24:
            dx = F.linear(gy, ss.to_sparse_24(w.detach().t().contiguous()))
        else:
            dx = gy @ w
        return dx, dw, db, None, None


class SparseLinear(nn.Module):
    """An nn.Linear (sharing its Parameters) whose products run per `mode` on sparse cores."""

    def __init__(self, lin: nn.Linear, mode: Mode):
        super().__init__()
        self.weight, self.bias, self.mode = lin.weight, lin.bias, mode
        if mode.w24:
            self.register_buffer("mask", transposable_pattern(*lin.weight.shape, lin.weight.device,
                                                              lin.weight.dtype))

    def forward(self, x):
        w = self.weight * self.mask if self.mode.w24 else self.weight
        samples = x.shape[0] if x.dim() > 2 else None
        y = _GemmFn.apply(x.reshape(-1, x.shape[-1]), w, self.bias, self.mode, samples)
        return y.view(*x.shape[:-1], w.shape[0])


class SparseConv1x1(nn.Module):
    """A 1x1 nn.Conv2d as a GEMM over channels_last positions, products per `mode`."""

    def __init__(self, conv: nn.Conv2d, mode: Mode):
        super().__init__()
        self.weight, self.bias, self.mode, self.stride = conv.weight, conv.bias, mode, conv.stride
        if mode.w24:
            self.register_buffer("mask", transposable_pattern(
                conv.out_channels, conv.in_channels, conv.weight.device, conv.weight.dtype).view(conv.weight.shape))

    def forward(self, x):
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        n, c, h, wd = x.shape
        w = self.weight * self.mask if self.mode.w24 else self.weight
        x2 = x.permute(0, 2, 3, 1).reshape(-1, c)
        y2 = _GemmFn.apply(x2, w.view(w.shape[0], c), self.bias, self.mode, n)
        return y2.view(n, h, wd, -1).permute(0, 3, 1, 2)


class _SDGPConvFn(torch.autograd.Function):
    """conv2d whose input gradient uses the Triton-pruned output gradient (no sparse cores for k>1)."""

    @staticmethod
    def forward(ctx, x, w, stride, padding, dilation, groups, method):
        ctx.save_for_backward(x, w)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.method = method
        return F.conv2d(x, w, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        from ..kernels import triton_prune as tp

        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        _, dw, _ = torch.ops.aten.convolution_backward(
            gy, x, w, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False])
        method = "magnitude" if ctx.method == "tile24" else ctx.method
        gp = tp.prune(gy, 2, 4, method, 1)
        dx = torch.ops.aten.convolution_backward(
            gp, x, w, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False])[0]
        return dx, dw, None, None, None, None, None


class SparseConv(nn.Module):
    """A k>1 nn.Conv2d (bias-free): SDGP via the Triton prune; 2:4 weights as a masked dense conv."""

    def __init__(self, conv: nn.Conv2d, mode: Mode):
        super().__init__()
        self.conv, self.mode = conv, mode
        if mode.w24:
            from ..patterns import nm_mask

            self.register_buffer("mask", nm_mask(conv.weight.detach().float(), 2, 4, dim=1).to(conv.weight.dtype))

    def forward(self, x):
        c = self.conv
        w = c.weight * self.mask if self.mode.w24 else c.weight
        if self.mode.sdgp:
            return _SDGPConvFn.apply(x, w, c.stride, c.padding, c.dilation, c.groups, self.mode.sdgp)
        return F.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)


def sparsify_for_bench(model: nn.Module, mode: Mode, keep_head: bool = True) -> nn.Module:
    """Replace the Linear and Conv2d layers that 2:4 applies to (channels multiples of 64, more than
    3 input channels; with keep_head, not the last Linear, the classifier) by the bench's sparse
    versions; returns the model."""
    if not (mode.w24 or mode.sdgp):
        return model
    head = None
    for name, mod in model.named_modules():
        if keep_head and isinstance(mod, nn.Linear):
            head = name  # the last Linear: the classifier stays dense
    for name, mod in list(model.named_modules()):
        new = None
        if isinstance(mod, nn.Linear) and name != head and mod.out_features % 64 == 0 and mod.in_features % 64 == 0:
            new = SparseLinear(mod, mode)
        elif isinstance(mod, nn.Conv2d) and mod.in_channels > 3 and mod.groups == 1 and mod.bias is None \
                and mod.out_channels % 64 == 0 and mod.in_channels % 64 == 0:
            if mod.kernel_size == (1, 1) and mod.padding in ((0, 0), 0):
                new = SparseConv1x1(mod, mode)
            else:
                new = SparseConv(mod, mode)
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    return model


# ------------------------------------------------------------------------------------------------
# 4. One transformer MLP block, forward + backward

class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


BLOCK_MODES = [Mode(), Mode(sdgp="rescale"), Mode(sdgp="magnitude"), Mode(sdgp="tile24"), Mode(w24=True),
               Mode(w24=True, sdgp="rescale")]


def bench_block(device, timer: Timer, quick: bool, log) -> list[dict]:
    dim, hidden = 768, 3072
    tokens = 8192 if quick else 16384
    seq = 256
    if device.type != "cuda":
        dim, hidden, tokens, seq = 64, 256, 128, 32
    dtype = torch.bfloat16
    rows, base = [], None
    xs = [torch.randn(tokens // seq, seq, dim, device=device, dtype=dtype) for _ in range(2)]
    gout = torch.randn_like(xs[0])
    for mode in BLOCK_MODES:
        row = {"block": f"MLP {dim}-{hidden}-{dim}", "tokens": tokens, "variant": mode.name}
        try:
            torch.manual_seed(0)
            block = sparsify_for_bench(MLPBlock(dim, hidden).to(device, dtype), mode, keep_head=False)
            row["sparse_layers"] = sum(isinstance(m, SparseLinear) for m in block.modules())

            def step(i, block=block):
                x = xs[i % 2].detach().requires_grad_()
                block(x).backward(gout)

            step(0)
            row["check"] = "ok"
            t = timer(step)
            row["s"] = t
            if base is None and not (mode.w24 or mode.sdgp):
                base = t
            row["speedup"] = base / t if base else None
        except Exception as e:
            row["check"] = _err_text(e)
        rows.append(row)
    return rows


def block_table(rows) -> str:
    return markdown_table(["block", "tokens", "variant", "sparse layers", "check", "fwd+bwd ms", "vs dense"],
                          [[r["block"], r["tokens"], r["variant"], r.get("sparse_layers", "-"),
                            r.get("check", "-"), _ms(r.get("s")), _x(r.get("speedup"))] for r in rows])


# ------------------------------------------------------------------------------------------------
# 5. Training steps

TRAIN_MODES = [Mode(), Mode(sdgp="rescale"), Mode(w24=True), Mode(w24=True, sdgp="rescale")]


def _train_models(device, quick: bool):
    from ..train.models import ViT, resnet50, vit_tiny

    if device.type != "cuda":
        return [("tiny ViT (dry run)", lambda: ViT(32, 8, 3, 64, 1, 2, 10), (2, 3, 32, 32), False)]
    return [
        ("vit_tiny (28x28, 1 ch)", lambda: vit_tiny(), (256 if quick else 512, 1, 28, 28), False),
        ("ViT-B/16 (224)", lambda: ViT(224, 16, 3, 768, 12, 12, 1000, 4, "cls"),
         (32 if quick else 64, 3, 224, 224), False),
        ("ResNet-50 (224, channels_last)", lambda: resnet50(), (32 if quick else 64, 3, 224, 224), True),
    ]


def bench_train(device, timer: Timer, quick: bool, log) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for name, factory, in_shape, channels_last in _train_models(device, quick):
        base = None
        for mode in TRAIN_MODES:
            row = {"model": name, "batch": in_shape[0], "variant": mode.name}
            try:
                torch.manual_seed(0)
                model = factory().to(device=device, dtype=dtype)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                model = sparsify_for_bench(model, mode)
                n_sparse = sum(isinstance(m, (SparseLinear, SparseConv1x1, SparseConv)) for m in model.modules())
                row["sparse_layers"] = n_sparse
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                data = [torch.randn(in_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                        for _ in range(2)]
                classes = 1000 if "ResNet" in name or "ViT-B" in name else 10
                labels = torch.randint(0, classes, (in_shape[0],), device=device)

                def step(i, model=model, opt=opt, data=data, labels=labels):
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(data[i % 2]).float(), labels)
                    loss.backward()
                    opt.step()

                step(0)
                row["check"] = "ok"
                t = timer(step)
                row["s"] = t
                row["samples_per_s"] = in_shape[0] / t
                if base is None and not (mode.w24 or mode.sdgp):
                    base = t
                row["speedup"] = base / t if base else None
                del model, opt, data
            except Exception as e:
                row["check"] = _err_text(e)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def train_table(rows) -> str:
    return markdown_table(
        ["model", "batch", "variant", "sparse layers", "check", "step ms", "samples/s", "vs dense"],
        [[r["model"], r["batch"], r["variant"], r.get("sparse_layers", "-"), r.get("check", "-"),
          _ms(r.get("s")), _x(r.get("samples_per_s"), 0), _x(r.get("speedup"))] for r in rows])


# ------------------------------------------------------------------------------------------------

def _paths(out) -> tuple[Path, Path] | None:
    if out is None:
        return None
    out = Path(out)
    if out.suffix == ".json":
        return out, out.with_suffix(".md")
    if out.suffix == ".md":
        return out.with_suffix(".json"), out
    return out / "bench-gpu.json", out / "bench-gpu.md"


def run(out=None, quick: bool = False, log=print, sections=None, _allow_cpu: bool = False) -> dict:
    """Run the GPU benchmarks; print each table as it is done; save JSON + Markdown to `out`.

    out: a .json or .md path (the other file is written beside it) or a directory
    (bench-gpu.json, bench-gpu.md in it). quick: smaller shapes and fewer repeats (a few minutes).
    sections: a subset of ("roofs", "prune", "gemm", "block", "train"). Returns the results dict.
    Raises SystemExit with NO_CUDA_MESSAGE when there is no CUDA device (``_allow_cpu`` runs a
    tiny dry run on the CPU instead, for tests: every sparse product then reports its error).
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif _allow_cpu:
        device = torch.device("cpu")
    else:
        raise SystemExit(NO_CUDA_MESSAGE)
    wanted = tuple(sections) if sections else ("roofs", "prune", "gemm", "block", "train")
    timer = Timer(device, warmup=2 if quick else 3, reps=10 if quick else 20)
    if device.type != "cuda":
        timer = Timer(device, warmup=1, reps=2)
    results: dict = {"environment": _environment(device), "quick": quick, "errors": [], "tables": {}}
    env = results["environment"]
    log(f"GPU: {env.get('gpu')} (sm {env.get('capability')}), torch {env['torch']}, CUDA {env['cuda']}, "
        f"cuSPARSELt {env.get('cusparselt')}, triton {env['triton']}; 2:4 sparse cores: {env['sparse_cores']}")
    copy_gbs = None
    t0 = time.perf_counter()

    def section(name, fn, table=None):
        if name not in wanted:
            return None
        log(f"\n## {name}")
        try:
            res = fn()
        except Exception as e:  # keep going: later sections may still work
            results["errors"].append({"section": name, "error": _err_text(e),
                                      "traceback": traceback.format_exc()[-3000:]})
            log(f"{name} failed: {_err_text(e)}")
            return None
        results[name] = res
        if table is not None:
            text = table(res)
            results["tables"][name] = text
            log(text)
        return res

    roofs = section("roofs", lambda: bench_roofs(device, timer, quick),
                    lambda r: markdown_table(["copy GB/s", "bf16 matmul TFLOP/s", "matmul n"],
                                             [[f"{r['copy_gbs']:.0f}", f"{r['matmul_tflops']:.0f}", r["matmul_n"]]]))
    if roofs:
        copy_gbs = roofs["copy_gbs"]
    section("prune", lambda: bench_prune(device, timer, quick, copy_gbs, log), prune_table)
    section("gemm", lambda: bench_gemm(device, timer, quick, log), gemm_table)
    section("block", lambda: bench_block(device, timer, quick, log), block_table)
    section("train", lambda: bench_train(device, timer, quick, log), train_table)
    results["seconds"] = time.perf_counter() - t0
    paths = _paths(out)
    if paths is not None:
        jpath, mpath = paths
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps(results, indent=1, default=str))
        head = [f"# nmsparse bench gpu{' (quick)' if quick else ''}", "",
                f"GPU: {env.get('gpu')} (sm {env.get('capability')}, {env.get('sms')} SMs, "
                f"{env.get('memory_gib')} GiB); torch {env['torch']}, CUDA {env['cuda']}, "
                f"cuSPARSELt {env.get('cusparselt')}, triton {env['triton']}, nmsparse {env.get('nmsparse')}; "
                f"{env['machine']}", ""]
        body = [f"## {k}\n\n{v}\n" for k, v in results["tables"].items()]
        errs = [f"- {e['section']}: {e['error']}" for e in results["errors"]]
        mpath.write_text("\n".join(head + body + (["## errors", ""] + errs if errs else [])) + "\n")
        log(f"\nwrote {jpath} and {mpath}")
    return results
