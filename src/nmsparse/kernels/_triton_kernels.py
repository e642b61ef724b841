"""Triton kernels for N:M pruning (no host code: see triton_prune.py, which imports this lazily).

Imported on first use only, because triton decides at import time whether kernels are compiled
or run by its interpreter (TRITON_INTERPRET=1, which also runs them on CPU tensors). Every kernel works on a logical (B, S, C) view of a strided tensor: B
samples, S positions, C channels grouped by M consecutive channels; element (b, s, c) lives at
b*sb + s*ss + c*sc, so NCHW (sc = H*W, ss = 1) and channels-last / Linear layouts (sc = 1) are
read in place. A program owns a tile of BLOCK_S positions x GROUPS groups x M channels.
"""

import triton
import triton.language as tl


@triton.jit
def _rank_keep(keys, n_keep, M: tl.constexpr):
    """Bool mask of the n_keep largest keys along the last axis (size M) of a 3-D tile.

    An entry's rank counts the entries that beat it: larger keys, and equal keys at an earlier
    position, so exactly n_keep entries per group are kept and ties go to the earlier position.
    Keys must be NaN-free.
    """
    j = tl.arange(0, M)[None, None, :]
    rank = tl.zeros(keys.shape, dtype=tl.int32)
    for i in tl.static_range(M):
        ki = tl.expand_dims(tl.max(tl.where(j == i, keys, -1.0), axis=2), 2)
        beats = (ki > keys) | ((ki == keys) & (j > i))
        rank += beats.to(tl.int32)
    return rank < n_keep


@triton.jit
def _tile(pid_s, b, cb, S, C, BLOCK_S: tl.constexpr, GROUPS: tl.constexpr, M: tl.constexpr):
    """Position and channel indices of a tile, as (BLOCK_S, 1, 1) and (1, GROUPS, M) int64."""
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c = cb * (GROUPS * M) + tl.arange(0, GROUPS)[:, None] * M + tl.arange(0, M)[None, :]
    return s.to(tl.int64)[:, None, None], c.to(tl.int64)[None, :, :]


@triton.jit
def _load_tile(x_ptr, S, C, n_sb, n_cb, sxb, sxs, sxc, BLOCK_S: tl.constexpr, GROUPS: tl.constexpr,
               M: tl.constexpr):
    """This program's tile: (pid_s, cb, b, s3, c3, valid, x as float32, 0 outside the tensor)."""
    pid = tl.program_id(0)
    pid_s = pid % n_sb
    rest = pid // n_sb
    cb = rest % n_cb
    b = (rest // n_cb).to(tl.int64)
    s3, c3 = _tile(pid_s, b, cb, S, C, BLOCK_S, GROUPS, M)
    valid = (s3 < S) & (c3 < C)
    x = tl.load(x_ptr + (b * sxb + s3 * sxs + c3 * sxc), mask=valid, other=0.0).to(tl.float32)
    return pid_s, cb, b, s3, c3, valid, x


@triton.jit
def _keys(x, b, s3, c3, S, C, seed, rng_offset, RANDOM: tl.constexpr):
    """Ranking keys of a float32 tile: |x| with NaN -> inf, or (RANDOM) tl.rand at the element's
    channels-last index with non-finite entries forced above every draw (2.0)."""
    ax = tl.abs(x)
    finite = ax < float("inf")
    if RANDOM:
        lin = (b * S + s3) * C + c3
        keys = tl.where(finite, tl.rand(seed, rng_offset + lin), 2.0)
    else:
        keys = tl.where(finite, ax, float("inf"))
    return keys


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def prune_kernel(x_ptr, out_ptr, mask_ptr, scale_ptr,
                 S, C, n_sb, n_cb,
                 sxb, sxs, sxc, sob, sos, soc, ssb, sss, ssc,
                 n_keep, seed, rng_offset,
                 M: tl.constexpr, BLOCK_S: tl.constexpr, GROUPS: tl.constexpr,
                 RANDOM: tl.constexpr, SCALE: tl.constexpr, MULTIPLY: tl.constexpr,
                 STORE_OUT: tl.constexpr, STORE_MASK: tl.constexpr, BF16_BITS: tl.constexpr):
    """out = x with all but the n_keep best of every M channels zeroed (optionally x * mask, times
    a per-(b, s, c) float32 scale read through strides ssb/sss/ssc), and/or the mask as uint8.

    BF16_BITS: out_ptr is a bfloat16 tensor viewed as int16, and the float32 result is rounded
    to nearest even by hand (the Triton interpreter truncates float32 -> bfloat16; compiled code
    rounds the same way as this).
    """
    pid_s, cb, b, s3, c3, valid, x = _load_tile(x_ptr, S, C, n_sb, n_cb, sxb, sxs, sxc, BLOCK_S, GROUPS, M)
    keep = _rank_keep(_keys(x, b, s3, c3, S, C, seed, rng_offset, RANDOM), n_keep, M)
    ooff = b * sob + s3 * sos + c3 * soc
    if STORE_OUT:
        if MULTIPLY:
            vals = x * keep.to(tl.float32)
        else:
            vals = tl.where(keep, x, 0.0)
        if SCALE:
            vals = vals * tl.load(scale_ptr + (b * ssb + s3 * sss + c3 * ssc), mask=valid, other=0.0)
        if BF16_BITS:
            bits = vals.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
            tl.store(out_ptr + ooff, tl.where(is_nan, 0x7FC0, rounded).to(tl.int16), mask=valid)
        else:
            tl.store(out_ptr + ooff, vals.to(out_ptr.dtype.element_ty), mask=valid)
    if STORE_MASK:
        tl.store(mask_ptr + ooff, keep.to(tl.uint8), mask=valid)


@triton.jit
def partial_sums_kernel(x_ptr, full_ptr, kept_ptr, S, C, n_sb, n_cb, sxb, sxs, sxc, n_keep,
                        M: tl.constexpr, BLOCK_S: tl.constexpr, GROUPS: tl.constexpr,
                        ROW: tl.constexpr):
    """Per-tile float32 sums of |x| and of |magnitude-pruned x| for rescale (the host adds them up).

    ROW=False: summed over the tile's positions, stored at [b, pid_s, c] of (B, n_sb, C) buffers;
    ROW=True: summed over the tile's channels, stored at [s, cb] of (S, n_cb) buffers.
    No loops: the tile grid is the same as prune_kernel's.
    """
    pid_s, cb, b, s3, c3, valid, x = _load_tile(x_ptr, S, C, n_sb, n_cb, sxb, sxs, sxc, BLOCK_S, GROUPS, M)
    keep = _rank_keep(_keys(x, b, s3, c3, S, C, 0, 0, False), n_keep, M)
    ax = tl.abs(x)
    kx = tl.where(keep, ax, 0.0)
    if ROW:
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        off = s.to(tl.int64) * n_cb + cb
        tl.store(full_ptr + off, tl.sum(tl.sum(ax, axis=2), axis=1), mask=s < S)
        tl.store(kept_ptr + off, tl.sum(tl.sum(kx, axis=2), axis=1), mask=s < S)
    else:
        c = cb * (GROUPS * M) + tl.arange(0, GROUPS)[:, None] * M + tl.arange(0, M)[None, :]
        off = (b * n_sb + pid_s) * C + c
        tl.store(full_ptr + off, tl.sum(ax, axis=0), mask=c < C)
        tl.store(kept_ptr + off, tl.sum(kx, axis=0), mask=c < C)


@triton.jit
def _column(t, j, i: tl.constexpr):
    """t[..., i] of a 3-D tile, broadcast back along the last axis (t >= -1 where it matters)."""
    return tl.expand_dims(tl.max(tl.where(j == i, t, -1.0), axis=2), 2)


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def mvue_kernel(x_ptr, out_ptr, S, C, n_sb, n_cb, sxb, sxs, sxc, sob, sos, soc, n_keep, seed, rng_offset,
                M: tl.constexpr, BLOCK_S: tl.constexpr, GROUPS: tl.constexpr):
    """SDGP "mvue" (see kernels/unbiased.py): per group of M, water-filling probabilities
    p_i = min(1, c|x_i|) with sum n_keep, systematic sampling with u = tl.rand(seed, rng_offset + k)
    for the group's channels-last number k, kept values x_i / p_i (sign(x_i) * S / r). Float32 math."""
    pid_s, cb, b, s3, c3, valid, x = _load_tile(x_ptr, S, C, n_sb, n_cb, sxb, sxs, sxc, BLOCK_S, GROUPS, M)
    j = tl.arange(0, M)[None, None, :]
    finite = tl.abs(x) < float("inf")
    a = tl.where(finite, tl.abs(x), 0.0)
    # rank: entries beating this one (larger, or equal and earlier), as reference._water_fill's stable sort
    rank = tl.zeros(a.shape, dtype=tl.int32)
    for i in tl.static_range(M):
        ai = _column(a, j, i)
        rank += ((ai > a) | ((ai == a) & (j > i))).to(tl.int32)
    rankf = rank.to(tl.float32)
    tail = tl.zeros(a.shape, dtype=tl.float32)  # sum of the entries ranked at or after this one
    for i in tl.static_range(M):
        ai = _column(a, j, i)
        ri = _column(rankf, j, i)
        tail += tl.where(ri >= rankf, ai, 0.0)
    nf = n_keep * 1.0
    fits = (rankf < nf) & ((nf - rankf) * a <= tail)
    jstar = tl.expand_dims(tl.min(tl.where(fits, rankf, nf), axis=2), 2)
    nonzero = a > 0
    few = tl.expand_dims(tl.sum(nonzero.to(tl.int32), axis=2), 2) <= n_keep
    capped = tl.where(few, nonzero, rankf < jstar)
    r = tl.where(few, 0.0, nf - jstar)
    free = tl.where(capped, 0.0, a)
    s = tl.expand_dims(tl.sum(free, axis=2), 2)
    ratio = tl.where(r > 0, r / tl.where(s > 0, s, 1.0), 0.0)
    q = free * ratio
    pos = q > 0
    last = tl.expand_dims(tl.max(tl.where(pos, j, -1), axis=2), 2)
    cum = tl.zeros(a.shape, dtype=tl.float32)  # inclusive prefix sums, left to right
    prev = tl.zeros(a.shape, dtype=tl.float32)  # exclusive
    for i in tl.static_range(M):
        qi = _column(q, j, i)
        cum += tl.where(j >= i, qi, 0.0)
        prev += tl.where(j > i, qi, 0.0)
    cum = tl.where(j >= last, r, tl.minimum(cum, r))
    prev = tl.where(j > last, r, tl.minimum(prev, r))
    group = ((b * S + s3) * C + c3) // M
    u = tl.rand(seed, rng_offset + group)
    drawn = pos & (tl.ceil(cum - u) > tl.ceil(prev - u))
    mag = tl.where(r > 0, s / tl.where(r > 0, r, 1.0), 0.0)
    value = tl.where(x > 0, mag, tl.where(x < 0, -mag, 0.0))
    vals = tl.where(capped | (~finite), x, tl.where(drawn, value, 0.0))
    tl.store(out_ptr + (b * sob + s3 * sos + c3 * soc), vals.to(out_ptr.dtype.element_ty), mask=valid)
