"""2:4 products on NVIDIA sparse tensor cores through PyTorch's semi-structured sparsity.

Thin wrappers, with errors that say what is missing, around
``torch.sparse.to_sparse_semi_structured`` (compress an already 2:4 tensor; cuSPARSELt or
CUTLASS), ``torch._sparse_semi_structured_tile`` (prune 4x4 tiles to a transposable 2:4
pattern and compress both the tensor and its transpose in one kernel),
``torch._sparse_semi_structured_apply`` and ``torch._cslt_sparse_mm``, plus the products that
nmsparse uses them for:

- ``sdgp_dx_separate``: SDGP's input gradient (N:M-pruned dY) @ W, pruned by our kernel
  (any SDGP method, 2:4) and compressed, then multiplied on sparse cores;
- ``sdgp_dx_tile24``: the fused route: dY pruned and compressed by the tile kernel (the
  "tile24" SDGP method: a different, transposable pattern; ``reference.tile24_prune_grad`` is
  its CPU twin), then multiplied;
- ``Linear24``: y = x @ W^T with W 2:4 (W already masked) on sparse cores, and with a
  transposable mask the backward-data product dY @ W on sparse cores as well.

None of this runs without an sm80+ NVIDIA GPU: every entry point raises
``SemiStructuredUnavailable`` otherwise. ``encode_tile_masks``/``decode_tile_masks`` (the
bitmask format of the tile op) and the argument checks are plain torch and run anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import TILE24_ALGORITHMS

__all__ = [
    "SemiStructuredUnavailable", "availability", "is_available", "require", "BACKENDS", "fused_tile_runs",
    "to_sparse_24", "prune_tile24", "tile24_raw", "apply_tile_masks", "apply_tile_masks_dense",
    "cslt_compress", "cslt_mm", "decode_tile_masks", "encode_tile_masks", "tile_masks_shape",
    "sdgp_dx_separate", "sdgp_dx_tile24", "Linear24", "linear24", "SPARSE_DTYPES",
]

BACKENDS = ("auto", "cusparselt", "cutlass")
SPARSE_DTYPES = (torch.float16, torch.bfloat16)


class SemiStructuredUnavailable(RuntimeError):
    """2:4 sparse tensor cores cannot be used here (no CUDA, an older GPU, a missing backend)."""


def availability(device=None) -> tuple[bool, str]:
    """(True, "") if 2:4 semi-structured products can run on `device` (default: the current
    CUDA device), else (False, why)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (2:4 sparse tensor cores need an NVIDIA GPU, sm80 or newer)"
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return False, f"device {dev} is not a CUDA device"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return False, (f"{torch.cuda.get_device_name(dev)} is sm{major}{minor}; 2:4 sparse tensor "
                       "cores need sm80 or newer (Ampere, Hopper, ...)")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return True, ""


def is_available(device=None) -> bool:
    return availability(device)[0]


def require(t: torch.Tensor, what: str, dtypes=SPARSE_DTYPES) -> None:
    """Raise SemiStructuredUnavailable (or TypeError/ValueError) unless `t` can go to the sparse cores."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise SemiStructuredUnavailable(
            f"{what} needs a CUDA tensor on an NVIDIA GPU with 2:4 sparse tensor cores (sm80+), got a "
            f"tensor on {t.device}. On a CPU, nmsparse.kernels.reference gives the same pruning "
            "patterns (prune_reference, tile24_prune_grad) with dense products.")
    ok, why = availability(t.device)
    if not ok:
        raise SemiStructuredUnavailable(f"{what}: {why}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{what} supports dtypes {tuple(dtypes)}, got {t.dtype}")


def _check_2d(t: torch.Tensor, what: str, rows_mult: int = 1, cols_mult: int = 1) -> None:
    if t.dim() != 2:
        raise ValueError(f"{what} needs a 2-D tensor, got shape {tuple(t.shape)}")
    r, c = t.shape
    if r % rows_mult or c % cols_mult:
        raise ValueError(f"{what}: shape {tuple(t.shape)} must have rows divisible by {rows_mult} "
                         f"and columns divisible by {cols_mult}")


def _sm(device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def _cutlass_runs(device) -> bool:
    """torch's CUTLASS 2:4 kernels are built for sm8x alone (an H100/H200 refuses them)."""
    return torch.cuda.get_device_capability(device)[0] == 8


def _backend_cls(backend: str, device=None):
    """The SparseSemiStructuredTensor class for `backend` on `device` (a CUDA device; None: current).

    "auto": cuSPARSELt where torch has it, else CUTLASS on sm8x; asking for CUTLASS on another
    architecture is an error that names the backend that runs there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cusparselt = torch.backends.cusparselt.is_available()
    if backend == "cusparselt" or (backend == "auto" and cusparselt):
        if not cusparselt:
            raise SemiStructuredUnavailable("cuSPARSELt is not available in this torch build; "
                                            "use backend='cutlass' (sm8x GPUs)")
        return SparseSemiStructuredTensorCUSPARSELT
    if not _cutlass_runs(device):
        raise SemiStructuredUnavailable(
            f"torch's CUTLASS 2:4 kernels run on sm8x GPUs only, this one is {_sm(device)}: use "
            + ("backend='cusparselt' or 'auto'" if cusparselt else "a torch build with cuSPARSELt"))
    return SparseSemiStructuredTensorCUTLASS


def to_sparse_24(dense: torch.Tensor, backend: str = "auto"):
    """Compress a 2-D tensor that is already 2:4 along its rows (last dim) for the sparse cores.

    Returns a torch.sparse.SparseSemiStructuredTensor A: ``A @ B`` (B dense) and
    ``F.linear(x, A)`` (A as the weight) run on sparse tensor cores. The entries beyond 2 per
    group of 4 are not checked (the backend would silently drop some): prune first.
    """
    require(dense, "to_sparse_24")
    _check_2d(dense, "to_sparse_24")
    return _backend_cls(backend, dense.device).from_dense(dense.contiguous())


def prune_tile24(x: torch.Tensor, algorithm: str = "largest_abs_values_greedy", backend: str = "cutlass"):
    """Prune each 4x4 tile of 2-D x to a transposable 2:4 pattern and compress it, in one kernel.

    Returns a SparseSemiStructuredTensor holding both x's and x^T's compressed forms (``.t()``
    is free), i.e. ``SparseSemiStructuredTensor<backend>.prune_dense_static_sort``. The kept
    entries are ``reference.tile24_mask(x, algorithm)``. x: float16/bfloat16, contiguous,
    columns a multiple of 32 (cuSPARSELt: rows and columns multiples of 128).
    """
    require(x, "prune_tile24")
    _require_tile_compress(x.device)
    if algorithm not in TILE24_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {TILE24_ALGORITHMS}, got {algorithm!r}")
    _check_2d(x, "prune_tile24", 1, 32)
    return _backend_cls(backend, x.device).prune_dense_static_sort(x.contiguous(), algorithm=algorithm)


def fused_tile_runs(device) -> bool:
    """Whether the fused tile24 prune-and-compress (``prune_tile24``) gives usable products on this CUDA device."""
    return _cutlass_runs(device)


def _require_tile_compress(device) -> None:
    """The tile op's compressed output is usable on sm8x only: CUTLASS's products refuse other GPUs, and on an
    H200 (torch 2.11, cuSPARSELt 0.8) its cuSPARSELt form held a different pattern from the tile mask (51%
    agreement, products off by 110%; the same pruned tensor compressed by cuSPARSELt itself was exact)."""
    if not fused_tile_runs(device):
        raise SemiStructuredUnavailable(
            f"the fused tile24 prune-and-compress runs on sm8x GPUs only, this one is {_sm(device)}: its masks "
            "(tile24_raw, ops.tile24_prune_grad) work here; compress the pruned tensor with to_sparse_24")


def tile24_raw(x: torch.Tensor, algorithm: str = "largest_abs_values_greedy", use_cutlass: bool = True):
    """``torch._sparse_semi_structured_tile``: (packed, meta, packed_t, meta_t, threads_masks)."""
    require(x, "tile24_raw")
    _check_2d(x, "tile24_raw", 1, 32)
    return torch._sparse_semi_structured_tile(x.contiguous(), algorithm=algorithm, use_cutlass=use_cutlass)


def apply_tile_masks(x: torch.Tensor, threads_masks: torch.Tensor):
    """``torch._sparse_semi_structured_apply``: x packed (CUTLASS layout, and its transpose) with
    the pattern that an earlier tile op returned in ``threads_masks``."""
    require(x, "apply_tile_masks")
    return torch._sparse_semi_structured_apply(x, threads_masks)


def apply_tile_masks_dense(x: torch.Tensor, threads_masks: torch.Tensor) -> torch.Tensor:
    """x with the entries outside the tile op's pattern zeroed (dense output)."""
    require(x, "apply_tile_masks_dense")
    return torch._sparse_semi_structured_apply_dense(x, threads_masks)


def cslt_compress(dense: torch.Tensor) -> torch.Tensor:
    """``torch._cslt_compress``: cuSPARSELt's compressed form of a 2:4 (along rows) 2-D tensor."""
    require(dense, "cslt_compress")
    if not torch.backends.cusparselt.is_available():
        raise SemiStructuredUnavailable("cuSPARSELt is not available in this torch build")
    return torch._cslt_compress(dense.contiguous())


def cslt_mm(compressed_a: torch.Tensor, dense_b: torch.Tensor, bias=None, transpose_result: bool = False,
            alg_id: int = 0) -> torch.Tensor:
    """``torch._cslt_sparse_mm``: A (compressed by cslt_compress) @ B."""
    require(dense_b, "cslt_mm")
    return torch._cslt_sparse_mm(compressed_a, dense_b, bias=bias, transpose_result=transpose_result,
                                 alg_id=alg_id)


# ----------------------------------------------------------------------------------------------
# threads_masks: the tile op's bitmask. One 8-byte entry per 8x8 block of x (a grid of
# ceil(rows/32)*4 x ceil(cols/64)*8 entries, following the kernel's 32x64 warp tiles); its four
# little-endian uint16 words are the 4x4 tiles top-left, top-right, bottom-left, bottom-right,
# bit (col + 4 * row) set for a kept entry.

def tile_masks_shape(rows: int, cols: int) -> tuple[int, int, int]:
    return (-(-rows // 32)) * 4, (-(-cols // 64)) * 8, 8


def decode_tile_masks(threads_masks: torch.Tensor, shape) -> torch.Tensor:
    """Bool mask of shape (rows, cols) from the tile op's threads_masks (any device; CPU result)."""
    rows, cols = shape
    gx, gy, nbytes = tile_masks_shape(rows, cols)
    if tuple(threads_masks.shape) != (gx, gy, nbytes) or threads_masks.dtype != torch.uint8:
        raise ValueError(f"threads_masks for a ({rows}, {cols}) tensor must be uint8 of shape "
                         f"{(gx, gy, nbytes)}, got {threads_masks.dtype} {tuple(threads_masks.shape)}")
    words = threads_masks.detach().cpu().contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    bits = (words.unsqueeze(-1) >> torch.arange(16, dtype=torch.int32)) & 1  # (gx, gy, 4, 16)
    # word q: tile row q // 2, tile col q % 2; bit: row * 4 + col inside the tile
    bits = bits.view(gx, gy, 2, 2, 4, 4).permute(0, 2, 4, 1, 3, 5)  # (gx, qr, r, gy, qc, c)
    return bits.reshape(gx * 8, gy * 8)[:rows, :cols].bool()


def encode_tile_masks(mask: torch.Tensor) -> torch.Tensor:
    """The threads_masks (uint8, CPU) that decode to `mask` (2-D bool)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    gx, gy, _ = tile_masks_shape(rows, cols)
    full = torch.zeros(gx * 8, gy * 8, dtype=torch.int32)
    full[:rows, :cols] = mask.detach().cpu().to(torch.int32)
    bits = full.view(gx, 2, 4, gy, 2, 4).permute(0, 3, 1, 4, 2, 5).reshape(gx, gy, 4, 16)
    words = (bits << torch.arange(16, dtype=torch.int32)).sum(-1)  # < 2**16
    return _words_to_bytes(words, gx, gy)


def _words_to_bytes(words: torch.Tensor, gx: int, gy: int) -> torch.Tensor:
    lo = (words & 0xFF).to(torch.uint8)
    hi = ((words >> 8) & 0xFF).to(torch.uint8)
    return torch.stack([lo, hi], dim=-1).reshape(gx, gy, 8)


# ----------------------------------------------------------------------------------------------
# Products.

def sdgp_dx_separate(gy: torch.Tensor, weight: torch.Tensor, method: str = "magnitude", *,
                     seed: int = 0, eps: float = 1e-4, backend: str = "auto") -> torch.Tensor:
    """SDGP's input gradient of a Linear, (2:4-pruned dY) @ W, on sparse tensor cores.

    gy: (..., out) with out = W's rows; dY is pruned 2:4 along `out` by the Triton kernel in gy's
    own shape (nmsparse's SDGP `method`, the same values as the dense route; rescale's planes
    follow gy's dims), then viewed as (tokens, out), compressed and multiplied: (..., in).
    """
    from .triton_prune import prune

    require(gy, "sdgp_dx_separate")
    pruned = prune(gy, 2, 4, method, -1, seed=seed, eps=eps).reshape(-1, gy.shape[-1])
    return (to_sparse_24(pruned, backend) @ weight).view(*gy.shape[:-1], weight.shape[1])


def sdgp_dx_tile24(gy: torch.Tensor, weight: torch.Tensor,
                   algorithm: str = "largest_abs_values_greedy", backend: str = "cutlass") -> torch.Tensor:
    """The fused route: dY (viewed as (tokens, out)) pruned to the transposable 4x4-tile 2:4
    pattern and compressed by one kernel (``prune_tile24``), then (pruned dY) @ W on sparse
    cores: (..., in). SDGP method "tile24"."""
    require(gy, "sdgp_dx_tile24")
    g2 = gy.reshape(-1, gy.shape[-1])
    return (prune_tile24(g2, algorithm, backend) @ weight).view(*gy.shape[:-1], weight.shape[1])


class Linear24(torch.autograd.Function):
    """y = x @ W^T + b with W (already masked to 2:4 along its input features) on sparse cores.

    Backward: dW = dY^T @ x and db dense; dX = dY @ W on sparse cores when `transposable` (the
    mask is 2:4 along W's columns too, so W^T is compressed as well), dense otherwise.
    W is compressed at every call (its values change at every optimizer step).
    """

    @staticmethod
    def forward(ctx, x, w, bias, transposable: bool, backend: str):
        require(x, "Linear24")
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, to_sparse_24(w, backend))
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, w)
        ctx.transposable, ctx.backend, ctx.has_bias = transposable, backend, bias is not None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.transposable:
                dx = F.linear(g2, to_sparse_24(w.t().contiguous(), ctx.backend))
            else:
                dx = g2 @ w
            dx = dx.view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db, None, None


def linear24(x, w, bias=None, transposable: bool = False, backend: str = "auto"):
    """Functional form of Linear24 (w must already be 2:4 along dim 1; transposable: also along dim 0)."""
    return Linear24.apply(x, w, bias, transposable, backend)
