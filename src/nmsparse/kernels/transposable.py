"""The compiled transposable N:M solvers (exact and greedy), and the ``transposable_mask`` that uses them where they apply.

``transposable_exact_native(w, n, m)`` solves every m x m tile of a 2-D CPU matrix exactly (the
mask with n kept per row and column of each tile that keeps the largest sum of |w|) in C++
(``csrc/transposable.cpp``, built on first use by ``_extensions``; needs a C++ compiler and ninja).
Per tile it runs successive shortest paths with potentials from a dual-feasible start (column
prices from a few rounds of row and column thresholds, then each row's top n), so only a little
column excess is left to move: the method of the PyTorch solver in ``patterns.transposable``, with
a better start and Dijkstra on small fixed-size arrays instead of a batched Bellman-Ford. Tiles run in parallel on ``torch.get_num_threads()`` threads; every tie is broken
by the lowest index, so the mask is the same for any thread count. On ties it may pick another
optimal mask than the PyTorch solver; the kept sum is the same up to float rounding.

Where the dispatch lives: ``patterns/`` (tier 1) may not import ``kernels/`` (tier 2), so
``patterns.transposable_mask`` stays the pure-PyTorch implementation (any device, the reference)
and this module's ``transposable_mask`` is the dispatching front: same signature and checks, the
native solver for ``method="exact"`` with ``NATIVE_MIN_M <= m <= NATIVE_MAX_M`` on a CPU tensor
(float16 and bfloat16 are widened to float32 exactly; float32 and float64 go as they are),
``patterns.transposable_mask`` otherwise and whenever the build is unavailable (no compiler, or
``NMSPARSE_NO_NATIVE=1``). ``nmsparse.transposable_mask``, ``nn/`` and ``prune/`` call this one.
m = 4 runs compiled too: on an idle machine, 4096 x 4096 at 2:4 on 1 thread, 0.36 s against 0.88 s for the
PyTorch path's enumeration of the 90 valid tiles (docs/benchmarks.md). m < 4 stays on the PyTorch path (m = 2: 2 valid tiles).
"""

from __future__ import annotations

import torch

from ..patterns.transposable import METHODS
from ..patterns.transposable import transposable_mask as torch_transposable_mask
from ..patterns.checks import check_2d, check_divisible, check_float_tensor, check_nm
from ._extensions import NativeExtension

__all__ = ["transposable_mask", "transposable_exact_native", "transposable_greedy_native", "uses_native", "native_available", "native_error",
           "NATIVE_MIN_M", "NATIVE_MAX_M"]

NATIVE_MIN_M = 4
NATIVE_MAX_M = 64  # the C++ solver keeps a tile's rows and columns as 64-bit sets
_WIDEN = (torch.float16, torch.bfloat16)

_extension = NativeExtension("nmsparse_transposable", ["transposable.cpp"],
                             extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])


def native_available() -> bool:
    """True when the compiled solver is built (building it now if needed: tens of seconds, once)."""
    return _extension.load() is not None


def native_error() -> str | None:
    """Why the compiled solver is unavailable (None when it is, or before the first attempt)."""
    return _extension.error


def transposable_exact_native(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Exact transposable N:M bool mask of 2-D CPU w by the compiled solver (any 1 <= m <= 64).

    A batch of tiles (T, m, m) is solved as the (T*m, m) matrix it reshapes to. RuntimeError when
    the solver cannot be built; use ``transposable_mask`` for the automatic fallback.
    """
    check_float_tensor(w, "w")
    n, m = check_nm(n, m)
    check_2d(w, "w")
    if w.device.type != "cpu":
        raise ValueError(f"transposable_exact_native runs on the CPU, got a tensor on {w.device}")
    if m > NATIVE_MAX_M:
        raise ValueError(f"transposable_exact_native supports m <= {NATIVE_MAX_M}, got m={m}")
    check_divisible(w.shape[0], m, "w dim 0", w.shape)
    check_divisible(w.shape[1], m, "w dim 1", w.shape)
    mod = _extension.load()
    if mod is None:
        raise RuntimeError(f"the compiled transposable solver is unavailable: {native_error()}")
    x = w.detach()
    if x.dtype in _WIDEN:
        x = x.float()
    return mod.transposable_exact(x.contiguous(), n, m)


def uses_native(w: torch.Tensor, n: int, m: int, method: str = "exact") -> bool:
    """Whether ``transposable_mask(w, n, m, method)`` runs compiled code (building it if needed): the exact
    solver for NATIVE_MIN_M <= m <= NATIVE_MAX_M, the greedy one for any m up to NATIVE_MAX_M."""
    low = NATIVE_MIN_M if method == "exact" else 1
    return (isinstance(w, torch.Tensor) and w.device.type == "cpu"
            and w.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            and isinstance(m, int) and low <= m <= NATIVE_MAX_M and isinstance(n, int) and 0 < n < m
            and native_available())


def transposable_greedy_native(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The greedy 2-approximate mask of 2-D CPU w (checked arguments) by the compiled code: the mask of
    ``patterns.transposable_mask(w, n, m, "greedy")``, tile by tile in C++ instead of m*m batched steps."""
    x = w.detach()
    if x.dtype in _WIDEN:
        x = x.float()
    return _extension.load().transposable_greedy(x.contiguous(), n, m)


def transposable_mask(w: torch.Tensor, n: int, m: int, method: str = "exact") -> torch.Tensor:
    """Bool mask of 2-D w whose every m x m tile keeps n entries per row and column.

    method="exact" maximises the kept sum of |w| in each tile: by the compiled solver
    (``nmsparse.kernels.transposable.transposable_exact_native``) for 4 <= m <= 64 on a CPU tensor,
    else (other devices, m < 4, or no C++ build) by the PyTorch solvers of
    ``nmsparse.patterns.transposable_mask`` (enumeration of the valid tiles for m <= 4, a batched
    min-cost flow otherwise). Where a tile has several optimal masks the two may pick different
    ones. method="greedy" is the fast 2-approximation: kept sum at least half the optimum, and
    some rows or columns may keep fewer than n (compiled on a CPU tensor, the same mask as PyTorch's).
    NaN and inf count as the largest magnitude.
    """
    check_float_tensor(w, "w")
    n, m = check_nm(n, m)
    check_2d(w, "w")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if uses_native(w, n, m, method):
        if method == "greedy":
            check_divisible(w.shape[0], m, "w dim 0", w.shape)
            check_divisible(w.shape[1], m, "w dim 1", w.shape)
            return transposable_greedy_native(w, n, m)
        return transposable_exact_native(w, n, m)
    return torch_transposable_mask(w, n, m, method)
