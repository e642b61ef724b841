"""Triton N:M pruning: SDGP's gradient pruning (every method but tile24) and SR-STE masking.

All functions take CUDA tensors (compiled kernels) or CPU tensors (the same kernels run by the
Triton interpreter: slow, for tests). They match ``nmsparse.kernels.reference``:

- "magnitude" and the mask of "rescale": bit for bit (|x| ranked with NaN and inf largest,
  ties to the earlier position, exactly n kept per group);
- "rescale": the pruned values times sum|g| / (sum|pruned g| + eps) per (sample, channel) plane
  (see ``reference.plane_dims``), summed in float32 in a different order than torch, so equal
  up to float rounding;
- "random": its own stream, not torch's: the key of the element with channels-last index e is
  ``tl.rand(seed, offset + e)`` (Philox-4x32-10), uniform in [0, 1), so the kept positions are
  a uniform n-subset of each group, reproducible from (seed, offset) and independent of the
  memory layout; ``reference.prune_random_reference`` computes the same on a CPU, bit for bit.
  Non-finite entries are always kept, as in the torch method.
- "random-unbiased": "random"'s kernel, then the kept values times m / n (bit for bit the
  torch method's product, given the same choice).
- "mvue": its own kernel (``_triton_kernels.mvue_kernel``): the water-filling and systematic
  sampling of ``kernels.unbiased`` in float32, one uniform ``tl.rand(seed, offset + k)`` per
  group k (channels-last order); ``unbiased.prune_mvue_reference`` computes the same on a CPU
  (equal up to float rounding of the group sums, which moves a choice only when u falls
  within a rounding error of an interval's end).

Supported: float16, bfloat16, float32; m in SUPPORTED_M; 1 <= n <= m.
"""

from __future__ import annotations

import math
import os

import torch

from ..patterns.checks import check_dim, check_divisible, check_float_tensor
from .reference import PRUNE_METHODS, SEED_STRIDE, _check_seed, check_prune_nm
from .unbiased import UNBIASED_METHODS

__all__ = ["SUPPORTED_M", "SUPPORTED_DTYPES", "triton_available", "interpreting", "prune",
           "srste_mask_apply", "seed_from_generator", "step_seed"]

SUPPORTED_M = (2, 4, 8, 16, 32)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TILE_ELEMS: int | None = None  # elements per program tile; None: _tile_elems' measured choice
_NUM_WARPS = 4  # warps per program (Triton's default; 8 was no faster on an H200)


def triton_available() -> bool:
    """True if triton can be imported (it may still have no GPU to compile for)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def interpreting() -> bool:
    """True if Triton runs kernels with its interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(device: torch.device):
    """The kernel module (imported on first use: triton reads TRITON_INTERPRET when it and the
    kernels are imported, and the interpreter cannot be switched on afterwards)."""
    from . import _triton_kernels

    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "the Triton kernels got CPU tensors, which only the Triton interpreter runs: set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported (or pass CUDA "
            "tensors); use nmsparse.kernels.reference for the same results on a CPU")
    return _triton_kernels


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _flatten(t: torch.Tensor, dims) -> tuple[int, int] | None:
    """(size, stride) of dims merged into one (logical order), or None if they cannot be."""
    dims = [i for i in dims if t.shape[i] != 1]
    if not dims:
        return 1, 0
    for a, b in zip(dims, dims[1:]):
        if t.stride(a) != t.stride(b) * t.shape[b]:
            return None
    return math.prod(t.shape[i] for i in dims), t.stride(dims[-1])


def _view(t: torch.Tensor, d: int, keep_batch: bool):
    """((B, S, C), (sb, ss, sc)) of t as samples x positions x channels, or None.

    keep_batch: dim 0 stays the B dim (rescale planes need it); otherwise every non-channel dim
    is merged into S where the strides allow (more positions per tile), B = 1.
    """
    nd = t.dim()
    C, sc = t.shape[d], t.stride(d)
    others = [i for i in range(nd) if i != d]
    if not keep_batch or d == 0:
        merged = _flatten(t, others)
        if merged is not None:
            return (1, merged[0], C), (0, merged[1], sc)
        if d == 0:
            return None
    rest = _flatten(t, [i for i in others if i != 0])
    if rest is None:
        return None
    return (t.shape[0], rest[0], C), (t.stride(0), rest[1], sc)


def _tile_elems(m: int, sc: int) -> int:
    """Elements per program tile (each ranked with M compares): 4096 for strided 2:4 channels (NCHW), where an
    H200 measured 5x (magnitude), 1.8x (random) and 4.8x (rescale) the GB/s of 2048 (docs/benchmarks.md);
    2048 elsewhere (contiguous 2:4: 4096 was 26% slower; contiguous 4:8: magnitude +6%, random -17%)."""
    if _TILE_ELEMS is not None:
        return _TILE_ELEMS
    return 4096 if sc != 1 and m == 4 else 2048


def _blocks(S: int, C: int, m: int, sc: int) -> tuple[int, int]:
    """(BLOCK_S, GROUPS) for a tile of about _tile_elems elements: wide along the contiguous dim."""
    if sc == 1:  # channels contiguous: about 64 consecutive channels per tile row
        groups = max(1, min(64 // m, _next_pow2(C // m)))
    else:
        groups = 1
    block_s = max(1, min(_next_pow2(S), _tile_elems(m, sc) // (groups * m)))
    return block_s, groups


def _check(x: torch.Tensor, n, m, method, dim, name: str = "x") -> tuple[int, int, int]:
    check_float_tensor(x, name)
    n, m = check_prune_nm(n, m)
    if m not in SUPPORTED_M:
        raise ValueError(f"the Triton kernels support m in {SUPPORTED_M}, got m={m}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels support {SUPPORTED_DTYPES}, got {x.dtype}")
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {PRUNE_METHODS}, got {method!r}")
    d = check_dim(x, dim)
    check_divisible(x.shape[d], m, f"{name}'s dim {dim}", x.shape)
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU tensors under the "
                         f"interpreter), got device {x.device}")
    return n, m, d


def _scale_mode(method: str, ndim: int, d: int) -> str:
    """How rescale sums: "" (no rescale), "row" (each row over its channels: a 2-D (batch,
    features) or 1-D g), "batch" (each (sample, channel) over the other dims), "all" (channel
    dim 0: each channel over all other dims). See reference.plane_dims."""
    if method != "rescale":
        return ""
    if ndim == 1 or (ndim == 2 and d == 1):
        return "row"
    return "batch" if d != 0 else "all"


def _run(x: torch.Tensor, n: int, m: int, d: int, method: str, seed: int, offset: int, eps: float,
         want_out: bool, want_mask: bool, multiply: bool, mode: str):
    k = _kernels(x.device)
    if method in UNBIASED_METHODS and n == m:
        method = "magnitude"  # n == m keeps everything as it is
    plane_batch = mode == "batch"
    xv = _view(x, d, keep_batch=plane_batch)
    out = torch.empty_like(x) if want_out else None
    mask = torch.empty_like(x, dtype=torch.bool) if want_mask else None
    ov = _view(out if out is not None else mask, d, keep_batch=plane_batch)
    if xv is None or ov is None or xv[0] != ov[0]:
        # Strides that cannot be merged: work on a channels-last copy, copy back into x's layout.
        xc = x.movedim(d, -1).contiguous()
        res = _run(xc, n, m, xc.dim() - 1, method, seed, offset, eps, want_out, want_mask, multiply,
                   mode)
        outc, maskc = res
        if out is not None:
            out.copy_(outc.movedim(-1, d))
        if mask is not None:
            mask.copy_(maskc.movedim(-1, d))
        return out, mask
    if x.numel() == 0:
        return out, mask
    (B, S, C), (sxb, sxs, sxc) = xv
    _, (sob, sos, soc) = ov
    block_s, groups = _blocks(S, C, m, sxc)
    n_sb, n_cb = triton_cdiv(S, block_s), triton_cdiv(C, groups * m)
    scale = None
    ss = (0, 0, 0)
    if mode:
        row = mode == "row"  # then B == 1: one scale per row s; otherwise one per (b, c)
        shape = (S, n_cb) if row else (B, n_sb, C)
        full = torch.empty(shape, device=x.device, dtype=torch.float32)
        kept = torch.empty_like(full)
        k.partial_sums_kernel[(B * n_cb * n_sb,)](
            x, full, kept, S, C, n_sb, n_cb, sxb, sxs, sxc, n,
            M=m, BLOCK_S=block_s, GROUPS=groups, ROW=row, num_warps=_NUM_WARPS)
        scale = full.sum(1) / (kept.sum(1) + eps)
        ss = (0, 1, 0) if row else (C, 0, 1)
    if method == "mvue":  # its own kernel; the kept mask is where the output is nonzero (or NaN)
        k.mvue_kernel[(B * n_cb * n_sb,)](
            x, out, S, C, n_sb, n_cb, sxb, sxs, sxc, sob, sos, soc, n, seed, offset,
            M=m, BLOCK_S=block_s, GROUPS=groups, num_warps=_NUM_WARPS)
        if mask is not None:
            mask.copy_((out != 0) | out.isnan())
        return out, mask
    dummy = x  # pointer arguments that a constexpr flag leaves unused
    bf16_bits = out is not None and scale is not None and out.dtype == torch.bfloat16
    k.prune_kernel[(B * n_cb * n_sb,)](
        x, (out.view(torch.int16) if bf16_bits else out) if out is not None else dummy,
        mask.view(torch.uint8) if mask is not None else dummy,
        scale if scale is not None else dummy,
        S, C, n_sb, n_cb, sxb, sxs, sxc, sob, sos, soc, *ss,
        n, seed, offset,
        M=m, BLOCK_S=block_s, GROUPS=groups, RANDOM=method in ("random", "random-unbiased"),
        SCALE=scale is not None,
        MULTIPLY=multiply, STORE_OUT=out is not None, STORE_MASK=mask is not None,
        BF16_BITS=bf16_bits, num_warps=_NUM_WARPS)
    if method == "random-unbiased" and out is not None and n < m:
        out.mul_(m / n)  # the same product as the torch method's, on the kept entries
    return out, mask


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def prune(x: torch.Tensor, n: int, m: int, method: str = "magnitude", dim: int = -1, *,
          seed: int = 0, offset: int = 0, eps: float = 1e-4, return_mask: bool = False):
    """x pruned n:m in groups of m consecutive entries along `dim`, in x's layout (no copy of x).

    Same semantics as ``reference.prune_reference`` (SDGP's prune_grad) for "magnitude" and
    "rescale"; "random" uses the keys tl.rand(seed, offset + e) (see the module doc). With
    return_mask=True returns (pruned, mask), the mask a bool tensor of x's shape and layout.
    """
    n, m, d = _check(x, n, m, method, dim)
    seed, offset = _check_seed(seed), _check_offset(offset)
    out, mask = _run(x.detach(), n, m, d, method, seed, offset, float(eps), True, return_mask, False,
                     _scale_mode(method, x.dim(), d))
    return (out, mask) if return_mask else out


def srste_mask_apply(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w * mask, mask) in one pass: mask = the n largest |w| in every m consecutive entries along
    dim 1 (a Linear's input features, a conv's input channels at each (co, kh, kw)).

    Matches ``reference.srste_reference`` bit for bit (a product, so pruned -x gives -0.0).
    """
    n, m, d = _check(w, n, m, "magnitude", 1, "w")
    return _run(w.detach(), n, m, d, "magnitude", 0, 0, 0.0, True, True, True, "")


def _check_offset(offset) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 1 << 62:
        raise ValueError(f"offset must be an int in [0, 2**62), got {offset!r}")
    return offset


def step_seed(seed: int, step: int) -> int:
    """The seed of a layer's backward number `step`, as nn.sdgp derives its generators' seeds."""
    return (seed * SEED_STRIDE + step) % (1 << 63)


def seed_from_generator(generator: torch.Generator | torch.Tensor | None) -> int:
    """A Triton seed for a torch.Generator: its initial seed (the one given to manual_seed), so a
    generator seeded from (seed, step) gives a reproducible stream (a key tensor: its value); without
    one, a fresh draw from torch's default generator (reproducible under torch.manual_seed)."""
    if isinstance(generator, torch.Tensor):
        return int(generator) % (1 << 63)
    if generator is not None:
        return generator.initial_seed() % (1 << 63)
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
