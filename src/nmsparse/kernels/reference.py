"""Torch reference implementations that the GPU kernels must reproduce, runnable on any device.

- ``prune_reference``: SDGP's N:M pruning of a gradient along a channel dim (magnitude, random
  from a torch.Generator, rescale), the same function as ``nmsparse.nn.sdgp.prune_grad`` (kept
  in sync by the tests; kernels/ may not import nn/).
- ``triton_rand`` and ``prune_random_reference``: the Triton kernels' own random stream
  (Philox-4x32-10 as in ``tl.rand(seed, offset)``), emulated bit for bit with numpy, so the
  GPU's "random" choices can be reproduced and checked on a CPU.
- ``srste_reference``: W * mask and the mask of SR-STE's N:M weight masking (groups along dim 1).
- ``tile24_mask`` / ``tile24_reference`` / ``tile24_prune_grad``: the transposable 2:4 pattern
  that ``torch._sparse_semi_structured_tile`` computes on 4x4 tiles (greedy over a
  Bose-Nelson sorting network), emulated on CPU tensors so accuracy experiments with the
  fused "tile24" SDGP route can run without a GPU.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ..patterns.checks import check_dim, check_divisible, check_float_tensor, check_nm
from ..common.text import did_you_mean
from ..patterns.nm import magnitude_key, nm_mask, topn_in_groups
from .draws import uniforms
from .unbiased import UNBIASED_METHODS, channels_last_shape, prune_mvue_layout, random_unbiased_grouped

__all__ = [
    "PRUNE_METHODS", "STOCHASTIC_METHODS", "SEED_STRIDE", "check_prune_nm", "prune_reference", "plane_dims", "triton_rand", "random_keys_reference",
    "prune_random_reference", "srste_reference", "TILE24_ALGORITHMS", "tile24_mask",
    "tile24_reference", "tile24_prune_grad", "sorting_network",
]

PRUNE_METHODS = ("magnitude", "random", "rescale") + UNBIASED_METHODS
# Methods that draw random numbers: a layer hands their backward what to draw from, made from (seed, step): a key
# tensor on the CPU (kernels.draws.step_key), a seeded generator elsewhere.
STOCHASTIC_METHODS = ("random",) + UNBIASED_METHODS
# A layer's backward number `step` draws its random choices from seed * SEED_STRIDE + step (hashed into the CPU
# key, seeding the GPU generator and the Triton kernels' Philox stream), so a reloaded model continues identically.
SEED_STRIDE = 1_000_003


def check_prune_nm(n, m) -> tuple[int, int]:
    """n:m of gradient pruning: 1 <= n <= m (n = 0 keeps nothing: no input gradient, and an overflow goes unseen)."""
    n, m = check_nm(n, m)
    if n < 1:
        raise ValueError(f"n must be >= 1 for gradient pruning, got n={n}")
    return n, m


def _check_prune_args(g, n, m, method, dim) -> tuple[int, int, int]:
    check_float_tensor(g, "g")
    n, m = check_prune_nm(n, m)
    d = check_dim(g, dim)
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {PRUNE_METHODS}, got {method!r}{did_you_mean(method, PRUNE_METHODS)}")
    check_divisible(g.shape[d], m, f"g's channel dim {dim}", g.shape)
    return n, m, d


def plane_dims(ndim: int, d: int) -> tuple[int, ...]:
    """Dims of the channels-last view (channel moved last) that rescale sums over.

    All dims but the sample dim 0 and the channel; with none left (a 2-D (batch, features)
    gradient, or a 1-D vector) the channel dim itself, i.e. each sample's whole row.
    """
    last = ndim - 1
    return tuple(range(1 if d != 0 else 0, last)) or (last,)


def _apply_rescale(gc: torch.Tensor, out: torch.Tensor, d: int, eps: float, dtype) -> torch.Tensor:
    dims = plane_dims(gc.dim(), d)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    full = torch.linalg.vector_norm(gc, 1, dims, keepdim=True, dtype=acc)
    kept = torch.linalg.vector_norm(out, 1, dims, keepdim=True, dtype=acc)
    scale = full / (kept + eps)
    return (out * scale).to(dtype) if out.requires_grad else out.mul_(scale)


def _restride(out: torch.Tensor, d: int, g: torch.Tensor) -> torch.Tensor:
    out = out.movedim(-1, d)
    if out.stride() != g.stride():
        out = torch.empty_like(g).copy_(out)
    return out


def topn_keys(keys: torch.Tensor, n: int) -> torch.Tensor:
    """topn_in_groups, or under torch.compile (which cannot trace its out= calls) a stable sort,
    which also gives ties to the earlier position."""
    if not torch.compiler.is_compiling():
        return topn_in_groups(keys, n)
    idx = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :n]
    return torch.zeros(keys.shape, dtype=torch.bool, device=keys.device).scatter_(1, idx, True)


def prune_reference(g: torch.Tensor, n: int, m: int, method: str = "magnitude", dim: int = 1,
                    generator: torch.Generator | None = None, eps: float = 1e-4) -> torch.Tensor:
    """g pruned n:m in groups of m consecutive entries along `dim`, in g's layout (SDGP's prune).

    "magnitude" keeps the n largest |g| (NaN and inf rank largest; ties go to the earlier
    position); "random" keeps n positions by uniform keys from `generator` (``kernels.draws``; non-finite
    entries are always kept); "rescale" is magnitude followed by scaling each (sample, channel)
    plane (see ``plane_dims``) by sum|g| / (sum|pruned g| + eps), computed in float32
    (float64 for float64 g). "random-unbiased" is "random" times m / n; "mvue" keeps n per group
    with the minimum-variance unbiased inclusion probabilities, one uniform per group from
    `generator` (see ``kernels.unbiased``).
    """
    n, m, d = _check_prune_args(g, n, m, method, dim)
    return prune_checked(g, n, m, method, d, generator, eps)


def prune_checked(g: torch.Tensor, n: int, m: int, method: str, d: int, generator, eps: float) -> torch.Tensor:
    """``prune_reference`` for arguments already validated (d non-negative): the torch path of prune_grad."""
    if n == m and method in STOCHASTIC_METHODS:  # every entry kept, unscaled: nothing to draw (no host read of a key)
        return g.clone()
    # Channels innermost: free for channels_last conv grads and Linear grads, one copy otherwise.
    if method == "mvue":  # in g's own layout; one uniform per group, drawn in channels-last group order
        return prune_mvue_layout(g, n, m, d, lambda shape: uniforms(
            channels_last_shape(shape, d), generator, g.device).movedim(-1, d))
    gc = g.movedim(d, -1).contiguous()
    if method in ("random", "random-unbiased"):
        keys = uniforms(gc.shape, generator, gc.device)
        keys.masked_fill_(~torch.isfinite(gc), 2.0)  # above any draw: non-finite entries stay
        mask = topn_keys(keys.view(-1, m), n).view(gc.shape)
        if method == "random-unbiased":
            out = random_unbiased_grouped(gc.view(-1, m), mask.view(-1, m), n).view(gc.shape)
            return _restride(out, d, g)
    elif torch.compiler.is_compiling():
        mask = topn_keys(magnitude_key(gc.detach()).view(-1, m), n).view(gc.shape)
    else:
        mask = nm_mask(gc.detach(), n, m, dim=-1)  # cache-sized chunks on the CPU; no gradient
    out = torch.where(mask, gc, 0)
    if method == "rescale":
        out = _apply_rescale(gc, out, d, eps, g.dtype)
    return _restride(out, d, g)


# ----------------------------------------------------------------------------------------------
# Triton's Philox stream (tl.rand), emulated with numpy.

_PHILOX_KEY_A = np.uint64(0x9E3779B9)
_PHILOX_KEY_B = np.uint64(0xBB67AE85)
_PHILOX_ROUND_A = np.uint64(0xD2511F53)
_PHILOX_ROUND_B = np.uint64(0xCD9E8D57)
_MASK32 = np.uint64(0xFFFFFFFF)
_RAND_SCALE = np.float32(4.6566127342e-10)  # triton.language.random.uint_to_uniform_float


def _philox_c0(seed: int, offsets: np.ndarray, n_rounds: int = 10) -> np.ndarray:
    """First output word of Philox-4x32 for counters (offset_lo, offset_hi, 0, 0), key = seed."""
    off = offsets.astype(np.uint64)
    c0 = off & _MASK32
    c1 = off >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for _ in range(n_rounds):
            p_b = _PHILOX_ROUND_B * c2  # < 2**64: exact in uint64
            p_a = _PHILOX_ROUND_A * c0
            c0, c1, c2, c3 = (((p_b >> np.uint64(32)) ^ c1 ^ k0) & _MASK32, p_b & _MASK32,
                              ((p_a >> np.uint64(32)) ^ c3 ^ k1) & _MASK32, p_a & _MASK32)
            k0 = (k0 + _PHILOX_KEY_A) & _MASK32
            k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def triton_rand(seed: int, offsets) -> torch.Tensor:
    """float32 values of ``tl.rand(seed, offsets)`` (Triton's default 10-round Philox), on the CPU.

    ``offsets`` is an int64 tensor or array (each value's low and high 32 bits are the first two
    Philox counters, as Triton does for 64-bit offsets); ``seed`` an int in [0, 2**63).
    """
    seed = _check_seed(seed)
    off = offsets.detach().cpu().numpy() if isinstance(offsets, torch.Tensor) else np.asarray(offsets)
    x = _philox_c0(seed, off.astype(np.int64)).astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    return torch.from_numpy(x.astype(np.float32) * _RAND_SCALE)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def random_keys_reference(shape, seed: int, offset: int = 0) -> torch.Tensor:
    """The random keys of the Triton "random" method for a channels-last tensor of this shape:
    element e (row-major index) gets tl.rand(seed, offset + e)."""
    numel = math.prod(shape)
    return triton_rand(seed, np.arange(numel, dtype=np.int64) + offset).view(tuple(shape))


def prune_random_reference(g: torch.Tensor, n: int, m: int, dim: int = 1, seed: int = 0,
                           offset: int = 0) -> torch.Tensor:
    """What the Triton kernel's "random" method returns: n positions per group of m along `dim`
    with the smallest rank of Philox keys tl.rand(seed, offset + e), e the element's index in the
    channels-last order (g.movedim(dim, -1)), so NCHW and channels_last give the same result.
    Non-finite entries are always kept; ties (practically never) go to the earlier position."""
    n, m, d = _check_prune_args(g, n, m, "random", dim)
    gc = g.movedim(d, -1).contiguous()
    keys = random_keys_reference(gc.shape, seed, offset).to(gc.device)
    keys.masked_fill_(~torch.isfinite(gc), 2.0)
    mask = topn_in_groups(keys.view(-1, m), n).view(gc.shape)
    return _restride(torch.where(mask, gc, 0), d, g)


def srste_reference(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w * mask, mask) with mask = the n largest |w| in groups of m along dim 1 (SR-STE forward).

    A product, not a select: a pruned -x gives -0.0 and a pruned inf gives NaN, as in nn.weight.
    """
    mask = nm_mask(w.detach(), n, m, dim=1)
    return w * mask, mask


# ----------------------------------------------------------------------------------------------
# torch._sparse_semi_structured_tile's 4x4-tile pattern.

TILE24_ALGORITHMS = ("largest_abs_values_greedy", "largest_values_greedy", "", "causal1122")


def _bose_nelson_merge(i: int, j: int, x: int, y: int, out: list) -> None:
    # PB<I, J, X, Y> of ATen's StaticSort.h (1-based indices).
    if x == 1 and y == 1:
        out.append((i - 1, j - 1))
    elif x == 1 and y == 2:
        out.append((i - 1, j))
        out.append((i - 1, j - 1))
    elif x == 2 and y == 1:
        out.append((i - 1, j - 1))
        out.append((i, j - 1))
    else:
        if x < 1 or y < 1:
            raise AssertionError(f"Bose-Nelson merge with an empty side ({x}, {y})")
        half = x >> 1
        mid = (y if x & 1 else y + 1) >> 1
        _bose_nelson_merge(i, j, half, mid, out)
        _bose_nelson_merge(i + half, j + mid, x - half, y - mid, out)
        _bose_nelson_merge(i + half, j, x - half, mid, out)


def _bose_nelson_sort(i: int, size: int, out: list) -> None:
    # PS<I, M> of StaticSort.h.
    if size <= 1:
        return
    half = size >> 1
    _bose_nelson_sort(i, half, out)
    _bose_nelson_sort(i + half, size - half, out)
    _bose_nelson_merge(i, i + half, half, size - half, out)


@lru_cache(maxsize=None)
def sorting_network(size: int) -> tuple[tuple[int, int], ...]:
    """The compare-exchange pairs (i0, i1) of ATen's StaticSort<size>, in order.

    Each one does ``if not (a[i0] < a[i1]): swap`` (ties and NaN swap too), which leaves the
    array in ascending order for comparable keys.
    """
    out: list = []
    _bose_nelson_sort(1, size, out)
    return tuple(out)


def _network_sort(keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Apply StaticSort to (tiles, k) keys, carrying idx along; returns idx in ascending key order."""
    keys = keys.clone()
    idx = idx.clone()
    for a, b in sorting_network(keys.shape[1]):
        ka, kb = keys[:, a].clone(), keys[:, b].clone()
        lt = ka < kb
        keys[:, a] = torch.where(lt, ka, kb)
        keys[:, b] = torch.where(lt, kb, ka)
        ia, ib = idx[:, a].clone(), idx[:, b].clone()
        idx[:, a] = torch.where(lt, ia, ib)
        idx[:, b] = torch.where(lt, ib, ia)
    return idx


def _greedy_tiles(vals: torch.Tensor, absolute: bool) -> torch.Tensor:
    """LargestValuesGreedy on (tiles, 16) row-major 4x4 tiles: bool (tiles, 16)."""
    keys = vals.float().abs() if absolute else vals.float()
    tiles = vals.shape[0]
    idx = torch.arange(16, dtype=torch.int64).expand(tiles, 16)
    order = _network_sort(keys, idx)
    rows = torch.zeros((tiles, 4), dtype=torch.int64)
    cols = torch.zeros((tiles, 4), dtype=torch.int64)
    keep = torch.zeros((tiles, 16), dtype=torch.bool)
    ar = torch.arange(tiles)
    for pos in range(15, -1, -1):  # the largest first
        e = order[:, pos]
        r, c = e // 4, e % 4
        sel = (rows[ar, r] < 2) & (cols[ar, c] < 2)
        keep[ar, e] = sel
        rows[ar, r] += sel
        cols[ar, c] += sel
    return keep


def _causal_tiles(vals: torch.Tensor) -> torch.Tensor:
    """Causal1122 on (tiles, 16): row r keeps at most (1, 1, 2, 2)[r], each column at most 2."""
    keys = vals.float()
    tiles = vals.shape[0]
    cols = torch.zeros((tiles, 4), dtype=torch.int64)
    keep = torch.zeros((tiles, 16), dtype=torch.bool)
    ar = torch.arange(tiles)
    for row, most in enumerate((1, 1, 2, 2)):
        idx = torch.arange(4, dtype=torch.int64).expand(tiles, 4)
        order = _network_sort(keys[:, 4 * row: 4 * row + 4], idx)
        count = torch.zeros(tiles, dtype=torch.int64)
        for pos in range(3, -1, -1):
            c = order[:, pos]
            sel = (cols[ar, c] < 2) & (count < most)
            keep[ar, 4 * row + c] = sel
            cols[ar, c] += sel
            count += sel
    return keep


_TILE_CHUNK = 1 << 16  # tiles per chunk: keeps the emulation's temporaries small


def tile24_mask(x: torch.Tensor, algorithm: str = "largest_abs_values_greedy") -> torch.Tensor:
    """Bool mask that ``torch._sparse_semi_structured_tile(x, algorithm)`` keeps, computed on the CPU.

    x is 2-D with a number of columns divisible by 4 (the CUDA op needs a multiple of 32 and
    a float16/bfloat16 contiguous tensor; this emulation takes any float dtype, ranking in
    float32, which preserves the order of float16/bfloat16 values). Every aligned 4x4 tile
    keeps at most 2 entries in each of its rows and columns (a transposable 2:4 pattern,
    sometimes fewer than 8 entries per tile):

    - "largest_abs_values_greedy": entries by descending |x|, each taken if its row and column
      of the tile still have room;
    - "largest_values_greedy" and "" (the op's default): the same by signed value;
    - "causal1122": rows in order, row r keeps at most 1, 1, 2, 2 entries, columns at most 2.

    The order is ATen's StaticSort (a Bose-Nelson sorting network over the 16 values in
    row-major order, swapping on ties), so ties and NaN resolve exactly as on the GPU.
    Rows past a multiple of 4 are padded with -inf as the CUDA kernel does (which, under the
    absolute-value ranking, outranks everything: the padding takes room in the last tile).
    """
    if algorithm not in TILE24_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {TILE24_ALGORITHMS}, got {algorithm!r}")
    check_float_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    rows, cols = x.shape
    check_divisible(cols, 4, "x's dim 1 (columns)", x.shape)
    v = x.detach().to("cpu", torch.float32)
    pad = (-rows) % 4
    if pad:
        v = torch.cat([v, v.new_full((pad, cols), -math.inf)])
    tr, tc = v.shape[0] // 4, cols // 4
    tiles = v.view(tr, 4, tc, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    keep = torch.empty(tiles.shape, dtype=torch.bool)
    for s in range(0, tiles.shape[0], _TILE_CHUNK):
        chunk = tiles[s: s + _TILE_CHUNK]
        if algorithm == "causal1122":
            keep[s: s + _TILE_CHUNK] = _causal_tiles(chunk)
        else:
            keep[s: s + _TILE_CHUNK] = _greedy_tiles(chunk, algorithm == "largest_abs_values_greedy")
    mask = keep.view(tr, tc, 4, 4).permute(0, 2, 1, 3).reshape(tr * 4, cols)[:rows]
    return mask.to(x.device)


def tile24_reference(x: torch.Tensor, algorithm: str = "largest_abs_values_greedy") -> torch.Tensor:
    """x with the entries outside ``tile24_mask(x, algorithm)`` set to zero (same dtype, device)."""
    return torch.where(tile24_mask(x, algorithm), x, 0)


def tile24_prune_grad(g: torch.Tensor, dim: int = -1,
                      algorithm: str = "largest_abs_values_greedy") -> torch.Tensor:
    """SDGP's "tile24" method on the CPU: g pruned by the fused route's transposable 2:4 pattern.

    g is viewed as the 2-D matrix (positions, channels) with the channel dim `dim` last (for a
    Linear, (tokens, out features); for a conv, (N*H*W, C)), as the sparse backward-data GEMM
    sees it, and pruned by ``tile24_mask``: each aligned block of 4 consecutive positions x 4
    consecutive channels keeps at most 2 entries per row and per column, greedily by |g|.
    At most 2 of every 4 channels are kept at each position (sometimes fewer); unlike the
    "magnitude" method, a position's choice also depends on its 3 neighbours in the tile.
    The positions are padded to a multiple of 4 as the CUDA kernel would pad them.
    """
    check_float_tensor(g, "g")
    d = check_dim(g, dim)
    check_divisible(g.shape[d], 4, f"g's channel dim {dim}", g.shape)
    gc = g.movedim(d, -1).contiguous()
    g2 = gc.reshape(-1, gc.shape[-1])
    out = tile24_reference(g2, algorithm).view(gc.shape)
    return _restride(out, d, g)
