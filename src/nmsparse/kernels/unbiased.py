"""Unbiased N:M gradient pruning (Chmiel, Hubara, Banner, Soudry, ICLR 2023): torch reference.

Two SDGP methods whose pruned gradient equals the dense one in expectation, E[out] = g:

- "mvue" (minimum-variance unbiased estimator): in every group g_1..g_m keep exactly n entries
  (all nonzeros, unscaled, where at most n are nonzero), entry i with inclusion probability
  p_i = min(1, c |g_i|), c chosen so that sum_i p_i = n ("water-filling"), and the kept value
  g_i / p_i. Among unbiased estimators that keep n per group its total variance
  sum_i g_i^2 (1 - p_i) / p_i is the least (``mvue_variance``). The n entries are drawn by
  systematic sampling over the group in channel order with ONE uniform u per group: the
  capped entries (p_i = 1) are kept; the others get intervals of length p_i laid end to end on
  [0, r), r = n - #capped, and entry i is kept when one of the points u, u + 1, ..., u + r - 1
  falls in its interval. That realises the marginals p_i exactly with exactly r draws. Every
  uncapped kept entry has the same magnitude: g_i / p_i = sign(g_i) * S / r with S the sum of
  the uncapped |g|, which is how the value is computed (no division by a small p_i). For 1:2
  it is the paper's MVUE 1:2: keep a with probability |a| / (|a| + |b|) as sign(a)(|a| + |b|).
- "random-unbiased": "random"'s choice (n uniform positions per group, the same keys from the
  same generator) scaled by m / n: unbiased, the high-variance baseline.

Non-finite entries are kept as they are (so a gradient scaler still sees an overflow); for
"mvue" they count as zero in the water-filling, so such a group keeps its n sampled entries
plus its non-finite ones. n == m is the identity for both.

The Triton kernel (``triton_prune``, method "mvue") draws u for group number k (groups counted
in the channels-last order) as ``tl.rand(seed, offset + k)``; ``prune_mvue_reference`` computes
the same on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["UNBIASED_METHODS", "prune_mvue_layout", "mvue_probabilities", "mvue_variance", "random_unbiased_variance",
           "mvue_grouped", "random_unbiased_grouped", "group_uniforms_reference", "prune_mvue_reference",
           "prune_random_unbiased_reference"]

UNBIASED_METHODS = ("random-unbiased", "mvue")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _water_fill(A: torch.Tensor, n: int):
    """For (m, G) non-negative finite A (one group per column): (capped, r, S) of the water-filling.

    capped (m, G): the entries with p_i = 1 (for a group with at most n nonzeros, all its nonzeros);
    r = n - #capped (0 for such a group): how many of the other entries are drawn, each with
    p_i = r * a_i / S, S = their sum. Found by capping repeatedly (c = r / S; cap every entry with
    c * a_i > 1, which can only grow the capped set), at most n rounds; in exact arithmetic the same
    set as the sorted rule "the first j with (n - j) a_(j) <= sum_{i >= j} a_(i)" of the kernel.
    """
    nonzero = A > 0
    few = nonzero.sum(0) <= n
    capped = torch.zeros_like(nonzero)
    r = torch.full(A.shape[1:], float(n), dtype=A.dtype, device=A.device)
    s = A.sum(0)
    for _ in range(n):
        new = (A * (r / s) > 1)  # s = 0 only where few (0/0, inf: overridden below)
        new &= ~capped
        new &= ~few
        if not bool(new.any()):
            break
        capped |= new
        r = n - capped.sum(0, dtype=A.dtype)
        s = A.masked_fill(capped, 0).sum(0)
    capped = torch.where(few, nonzero, capped)
    r = r.masked_fill(few, 0)
    s = s.masked_fill(few, 0)
    return capped, r, s


def _mvue_columns(cols: list[torch.Tensor], n: int, u: torch.Tensor) -> list[torch.Tensor]:
    """"mvue" with the group's m entries given as m tensors of one shape (entry i of every group in
    cols[i], any strides) and u the groups' uniforms in that shape; returns the m output columns.

    Column by column, so a conv gradient is pruned in its own layout with no transposed copy.
    """
    m = len(cols)
    ct = _compute_dtype(cols[0].dtype)
    A = [c.abs().to(ct) for c in cols]
    s = torch.stack(A).sum(0) if m > 8 else sum(A[1:], A[0].clone())
    all_finite = bool(torch.isfinite(s).all())  # a NaN or inf entry makes its group's sum non-finite
    if not all_finite:
        finite = [torch.isfinite(a) for a in A]
        for a, f in zip(A, finite):
            a.masked_fill_(~f, 0)
        s = sum(A[1:], A[0].clone())
    nz = sum(((a > 0).to(torch.int8) for a in A[1:]), (A[0] > 0).to(torch.int8))
    few = nz <= n
    capped = [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for _ in range(m)]
    r = torch.full(s.shape, float(n), dtype=ct, device=s.device)
    if n > 1:  # with n = 1, c * a_i = a_i / S <= 1: nothing is ever capped
        for _ in range(n):
            c = r / s  # s = 0 only where few (0/0: overridden below)
            grew = False
            for i in range(m):
                new = (A[i] * c > 1) & ~capped[i] & ~few
                if bool(new.any()):
                    capped[i] |= new
                    grew = True
            if not grew:
                break
            r = n - sum(cp.to(ct) for cp in capped)
            s = sum(a.masked_fill(cp, 0) for a, cp in zip(A, capped))
    r.masked_fill_(few, 0)
    pos_r = r > 0
    ratio = (r / s).masked_fill_(~pos_r, 0)  # c = r / S
    mag = (s / r).masked_fill_(~pos_r, 0)  # the kept value |g_i| / p_i of every drawn entry
    q = [a.masked_fill_(cp | few, 0).mul_(ratio) for a, cp in zip(A, capped)]  # p_i of the drawn entries
    # Systematic sampling: intervals of length q_i laid end to end on [0, r) in channel order; from
    # the last entry with q > 0 on, the end is r exactly, so exactly r of the points u + k land.
    pos = [qi > 0 for qi in q]
    last = torch.full(s.shape, -1, dtype=torch.int8, device=s.device)
    for i in range(m):
        last.masked_fill_(pos[i], i)
    uu = u.to(ct)
    cum = torch.zeros(s.shape, dtype=ct, device=s.device)
    prev = torch.ceil(-uu)
    out = []
    for i in range(m):
        cum += q[i]
        now = torch.ceil(torch.where(last <= i, r, torch.minimum(cum, r)).sub_(uu))
        drawn = (now > prev) & pos[i]
        prev = now
        g = cols[i].to(ct)
        keep = capped[i] | few
        if not all_finite:
            keep |= ~finite[i]
        out.append(torch.where(keep, g, torch.sign(g).mul_(mag).mul_(drawn)).to(cols[i].dtype))
    return out


def mvue_grouped(gc: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """"mvue" on (G, m) groups (channels last) with one uniform u[k] in [0, 1) per group."""
    G, m = gc.shape
    if n >= m or G == 0:
        return gc.clone()
    return torch.stack(_mvue_columns(list(gc.unbind(1)), n, u), 1)


def prune_mvue_layout(g: torch.Tensor, n: int, m: int, d: int, u_shape_fn) -> torch.Tensor:
    """"mvue" of g along dim d (m divides it) in g's own layout. u_shape_fn(shape) gives the uniforms
    for groups of that shape (the shape with the channel dim d replaced by C / m), one per group
    in the channels-last order of the groups."""
    if n >= m or g.numel() == 0:
        return g.clone()
    g5 = g.unflatten(d, (g.shape[d] // m, m))
    cols = [g5.select(d + 1, i) for i in range(m)]
    u = u_shape_fn(cols[0].shape)
    out = torch.empty_like(g)
    o5 = out.unflatten(d, (g.shape[d] // m, m))
    for i, c in enumerate(_mvue_columns(cols, n, u)):
        o5.select(d + 1, i).copy_(c)
    return out


def random_unbiased_grouped(gc: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """"random-unbiased" on (G, m) groups: the kept entries (random's mask) times m / n."""
    m = gc.shape[1]
    if n >= m:
        return gc.clone()
    return torch.where(keep, gc * (m / n), 0)


def group_uniforms_reference(groups: int, seed: int, offset: int = 0) -> torch.Tensor:
    """The Triton "mvue" kernel's uniforms: group k (channels-last order) gets tl.rand(seed, offset + k)."""
    from .reference import triton_rand

    return triton_rand(seed, np.arange(groups, dtype=np.int64) + offset)


def prune_mvue_reference(g: torch.Tensor, n: int, m: int, dim: int = 1, seed: int = 0,
                         offset: int = 0) -> torch.Tensor:
    """What the Triton kernel's "mvue" returns (its uniforms, ``group_uniforms_reference``), in g's layout."""
    from .reference import _check_prune_args

    n, m, d = _check_prune_args(g, n, m, "mvue", dim)
    return prune_mvue_layout(g, n, m, d, lambda shape: group_uniforms_reference(
        math.prod(shape), seed, offset).view(channels_last_shape(shape, d)).movedim(-1, d).to(g.device))


def prune_random_unbiased_reference(g: torch.Tensor, n: int, m: int, dim: int = 1, seed: int = 0,
                                    offset: int = 0) -> torch.Tensor:
    """What the Triton kernel's "random-unbiased" returns: its "random" choice times m / n."""
    from .reference import prune_random_reference

    out = prune_random_reference(g, n, m, dim, seed, offset)
    return out * (m / n) if n < m else out


def channels_last_shape(shape, d: int) -> tuple[int, ...]:
    """`shape` with dim d moved last: the order in which groups are numbered for their uniforms."""
    shape = list(shape)
    return tuple(shape[:d] + shape[d + 1:] + [shape[d]])


def _groups(g: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    return g.detach().movedim(dim, -1).reshape(-1, m)


def mvue_probabilities(g: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """The inclusion probabilities p_i of "mvue" (float64 for float64 g, else float32), g's shape."""
    gc = g.detach().movedim(dim, -1)
    ct = _compute_dtype(g.dtype)
    if n >= m:
        return torch.ones(gc.shape, dtype=ct, device=g.device).movedim(-1, dim)
    a = _groups(g, m, dim)
    A = torch.where(torch.isfinite(a), a.abs(), 0).to(ct).t().contiguous()
    capped, r, s = _water_fill(A, n)
    q = torch.where(capped, 1.0, A * torch.where(s > 0, r / torch.where(s > 0, s, 1), 0))
    return q.t().reshape(gc.shape).movedim(-1, dim)


def mvue_variance(g: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """The total variance sum_i g_i^2 (1 - p_i) / p_i of "mvue" (finite g; float64 for float64 g)."""
    p = mvue_probabilities(g, n, m, dim)
    g2 = g.detach().to(p.dtype) ** 2
    return torch.where(p > 0, g2 * (1 - p) / torch.where(p > 0, p, 1), 0).sum()


def random_unbiased_variance(g: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The total variance of "random-unbiased": sum_i g_i^2 (m / n - 1) (each kept with p = n / m)."""
    g2 = g.detach().to(_compute_dtype(g.dtype)) ** 2
    return g2.sum() * (m / n - 1)
