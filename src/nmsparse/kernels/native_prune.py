"""N:M weight masks and SDGP gradient pruning on the CPU by the compiled one-pass kernel (``csrc/nm_prune.cpp``).

The torch path runs a method as a dozen whole-tensor passes; the kernel reads each group of m once and
decides it in registers. Same values as the torch path (``kernels.reference.prune_checked``,
``patterns.nm.nm_mask``): the random methods and mvue hash the same key from the same generator
(``kernels.draws``), and only rescale's plane sums are added in another order (its scale
may differ in the last bit). Each function returns None where the kernel does not apply (not a CPU
tensor, m above 32, autograd through the input, torch.compile tracing, a layout it cannot view
without a copy, or no build: no compiler, or ``NMSPARSE_NO_NATIVE=1``); callers then take the torch
path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..patterns.transposable import conv_from_2d, conv_to_2d
from ._extensions import NativeExtension
from .draws import draw_key

__all__ = ["prune_grad_native", "prune_grad_op", "kernel_takes", "nm_mask_native", "masked_weight_native", "srste_grad_native",
           "native_prune_available", "native_prune_error", "MAX_M"]

MAX_M = 32
_CODES = {"magnitude": 0, "random": 1, "rescale": 2, "random-unbiased": 3, "mvue": 4}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # what the kernel takes

# -ffp-contract=off: no fused multiply-add, so the float arithmetic rounds as the torch path's does.
# -Wno-psabi: the float64 lane vectors (64 bytes) stay inside the file, so the note on their ABI does not apply.
_extension = NativeExtension("nmsparse_nm_prune", ["nm_prune.cpp"], extra_ldflags=["-fopenmp"],
                             extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-Wno-psabi"])


def native_prune_available() -> bool:
    """True when the kernel is built (building it now if needed: tens of seconds, once)."""
    return _extension.load() is not None


def native_prune_error() -> str | None:
    """Why the kernel is unavailable (None when it is, or before the first attempt)."""
    return _extension.error


def _plain(*tensors: torch.Tensor) -> bool:
    """Plain tensors and Parameters only: another subclass (FakeTensor while tracing, DTensor) has no data for C++
    to read. (A Parameter does: SR-STE's backward gets the layer's weight Parameter, and refusing it sent every
    SR-STE backward to the torch path's three passes.)"""
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


def kernel_takes(x: torch.Tensor, m: int) -> bool:
    """Whether the kernel can prune x in groups of m (device, dtype, m, non-empty, no autograd through x): also
    what decides, under torch.compile, whether the custom op ``prune_grad_op`` stands in for the torch path."""
    return x.device.type == "cpu" and x.dtype in DTYPES and m <= MAX_M and x.numel() > 0 and not x.requires_grad


def _applies(x: torch.Tensor, m: int) -> bool:
    return kernel_takes(x, m) and _plain(x) and not torch.compiler.is_compiling()


def _bock(t: torch.Tensor, d: int) -> torch.Tensor | None:
    """t as a (B, O, C, I) view (channels = dim d; for d = 0, B = O = 1), or None if its strides do not allow one."""
    shape = t.shape
    if d == 0:
        b, o = 1, 1
    else:
        b, o = shape[0], math.prod(shape[1:d])
    inner = math.prod(shape[d + 1:])
    try:
        return t.view(b, o, shape[d], inner)
    except RuntimeError:  # not expressible as a view (e.g. a permuted tensor whose dims do not merge)
        return None


def _channels_innermost(t: torch.Tensor, d: int) -> torch.Tensor | None:
    """A tensor whose channels (dim d) are innermost in memory with dims after them (a channels_last conv gradient)
    as (B, O * I, C, 1) rows, a view the row path takes; else None. The kernel's entry and group numbers and
    rescale's (sample, channel) planes are the same in both views: they are counted in channels-last order."""
    if d == t.dim() - 1 or t.dim() < 3:
        return None
    tc = t.movedim(d, -1)
    if not tc.is_contiguous():
        return None
    b = 1 if d == 0 else t.shape[0]
    return tc.view(b, -1, t.shape[d], 1)


def prune_grad_native(g: torch.Tensor, n: int, m: int, method: str, d: int,
                      generator: torch.Generator | torch.Tensor | None = None,
                      eps: float = 1e-4) -> torch.Tensor | None:
    """SDGP's prune of g (validated arguments, d non-negative) by the kernel, in g's layout; None where it does not
    apply. `generator`: a torch.Generator or a key tensor (``draws.step_key``)."""
    if method not in _CODES or not _applies(g, m):
        return None
    if n >= m:
        return None  # the identity: the torch path returns it without work
    if _extension.load() is None:
        return None
    out = torch.empty_like(g)
    g4, o4 = _channels_innermost(g, d), _channels_innermost(out, d)
    if g4 is None or o4 is None:
        g4, o4 = _bock(g, d), _bock(out, d)
    if g4 is None or o4 is None or g4.stride() != o4.stride():
        return None
    key = draw_key(generator) if method in ("random", "random-unbiased", "mvue") else 0  # one word per call
    row = g.dim() == 1 or (g.dim() == 2 and d == 1)  # no plane dims: rescale scales each sample's whole row
    _extension.module.prune_grad(g4, o4, n, m, _CODES[method], key, float(eps), row)
    return out


@torch.library.custom_op("nmsparse::prune_grad_cpu", mutates_args=())
def prune_grad_op(g: torch.Tensor, key: Optional[torch.Tensor], n: int, m: int, method: str, d: int,
                  eps: float) -> torch.Tensor:
    """SDGP's CPU prune as one opaque op, so a graph that torch.compile traces calls the kernel when it runs
    instead of tracing the torch path's dozen passes (measured: a compiled GPT step with SDGP rescale ran at
    2.1x the compiled dense step before this op). The random methods draw from `key` (``draws.step_key`` of the
    layer's seed and step, carried by the graph), so they do not break the graph either."""
    out = prune_grad_native(g, n, m, method, d, key, eps)
    if out is None:  # no build here, or an m the kernel does not take: the torch path, the same values
        from .reference import prune_checked

        out = prune_checked(g, n, m, method, d, key, eps)
    return out


@prune_grad_op.register_fake
def _prune_grad_op_fake(g, key, n, m, method, d, eps):
    return torch.empty_like(g)


def nm_mask_native(w: torch.Tensor, n: int, m: int, d: int) -> torch.Tensor | None:
    """Magnitude N:M bool mask of w along dim d (validated arguments) by the kernel; None where it does not apply."""
    if not 0 < n < m or not _applies(w.detach(), m) or _extension.load() is None:
        return None
    w = w.detach()
    if (w.dim() == 4 and d == 1 and m == 4 and w.dtype == torch.float32 and w.shape[2] * w.shape[3] > 1
            and _extension.module.row4_path()):
        # A conv weight's groups lie kh*kw apart: its (Co, kh*kw*Ci) copy puts them in rows for the row path and the
        # mask is laid back (ResNet-18's 512x512x3x3, 2:4: 1.72 ns per weight against 4.53 strided, measured).
        return conv_from_2d(nm_mask_native(conv_to_2d(w).contiguous(), n, m, 1), w.shape).contiguous()
    mask = torch.empty(w.shape, dtype=torch.bool)
    w4, m4 = _bock(w, d), _bock(mask, d)
    if w4 is None or w4.stride() != m4.stride():  # e.g. a channels_last conv weight
        w4 = _bock(w.contiguous(), d)
    _extension.module.nm_mask(w4, m4, n, m)
    return mask


def _elementwise_ok(*tensors: torch.Tensor) -> bool:
    t = tensors[0]
    return (t.device.type == "cpu" and t.dtype in DTYPES and _plain(*tensors) and all(x.is_contiguous() for x in tensors)
            and all(x.shape == t.shape for x in tensors) and not torch.compiler.is_compiling()
            and _extension.load() is not None)


def masked_weight_native(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """``w * mask`` (bool mask) in one pass, the same values; None where the kernel does not apply."""
    if mask.dtype != torch.bool or not _elementwise_ok(w, mask):
        return None
    return _extension.module.masked_weight(w, mask)


def srste_grad_native(grad: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor | None:
    """SR-STE's ``grad + decay * w.masked_fill(mask, 0)`` in one pass, the same values; None where it does not apply."""
    if mask.dtype != torch.bool or grad.dtype != w.dtype or not _elementwise_ok(grad, w, mask):
        return None
    return _extension.module.srste_grad(grad, w, mask, float(decay))
