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

import numpy as np
import torch

__all__ = ["UNBIASED_METHODS", "mvue_probabilities", "mvue_variance", "random_unbiased_variance",
           "mvue_grouped", "random_unbiased_grouped", "group_uniforms_reference"]

UNBIASED_METHODS = ("random-unbiased", "mvue")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _water_fill(a: torch.Tensor, n: int):
    """For (G, m) non-negative finite a: (capped bool, r, S) of the water-filling with n per group.

    capped: the entries with p_i = 1 (for a group with at most n nonzeros, all its nonzeros);
    r = n - #capped (0 for such a group): how many of the other entries are drawn, each with
    p_i = r * a_i / S, S = their sum of a. Ranks as in the kernel: an entry is beaten by larger
    entries and by equal entries at an earlier position (a stable descending sort).
    """
    G, m = a.shape
    srt, idx = torch.sort(a, dim=1, descending=True, stable=True)
    tail = srt.flip(1).cumsum(1).flip(1)  # tail[:, j] = sum of the sorted entries j, j+1, ...
    j = torch.arange(n, device=a.device)
    # The first j whose largest remaining entry fits: (n - j) * a_(j) <= sum_{i >= j} a_(i); true at j = n - 1.
    fits = (n - j).to(a.dtype) * srt[:, :n] <= tail[:, :n]
    jstar = fits.to(torch.int8).argmax(1)
    rank = torch.empty_like(idx).scatter_(1, idx, torch.arange(m, device=a.device).expand(G, m))
    nonzero = a > 0
    few = nonzero.sum(1) <= n  # keep every nonzero as it is
    capped = torch.where(few[:, None], nonzero, rank < jstar[:, None])
    r = torch.where(few, 0, n - jstar)
    s = torch.where(capped, 0, a).sum(1)
    return capped, r, s


def mvue_grouped(gc: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """"mvue" on (G, m) groups (channels last) with one uniform u[k] in [0, 1) per group."""
    G, m = gc.shape
    if n >= m or G == 0:
        return gc.clone()
    ct = _compute_dtype(gc.dtype)
    finite = torch.isfinite(gc)
    a = torch.where(finite, gc.abs(), 0).to(ct)
    capped, r, s = _water_fill(a, n)
    rf = r.to(ct)
    free = torch.where(capped, 0, a)
    ratio = torch.where(r > 0, rf / torch.where(s > 0, s, 1), 0)  # c = r / S
    q = free * ratio[:, None]  # p_i of the uncapped entries
    cum = q.cumsum(1).minimum(rf[:, None])
    # From the last entry with q > 0 on, the cumulative sum is r exactly: exactly r points land.
    pos = q > 0
    last = (m - 1) - pos.flip(1).to(torch.int8).argmax(1)
    cum = torch.where(torch.arange(m, device=gc.device) >= last[:, None], rf[:, None], cum)
    prev = torch.cat([cum.new_zeros(G, 1), cum[:, :-1]], 1)
    uu = u.to(ct)[:, None]
    drawn = pos & (torch.ceil(cum - uu) > torch.ceil(prev - uu))
    value = torch.sign(gc.to(ct)) * torch.where(r > 0, s / torch.where(r > 0, rf, 1), 0)[:, None]
    out = torch.where(capped, gc.to(ct), torch.where(drawn, value, 0)).to(gc.dtype)
    return torch.where(finite, out, gc)


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


def _groups(g: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    return g.detach().movedim(dim, -1).reshape(-1, m)


def mvue_probabilities(g: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """The inclusion probabilities p_i of "mvue" (float64 for float64 g, else float32), g's shape."""
    gc = g.detach().movedim(dim, -1)
    a = _groups(g, m, dim)
    ct = _compute_dtype(a.dtype)
    a = torch.where(torch.isfinite(a), a.abs(), 0).to(ct)
    if n >= m:
        return torch.ones(gc.shape, dtype=ct, device=g.device).movedim(-1, dim)
    capped, r, s = _water_fill(a, n)
    q = torch.where(capped, 1.0, torch.where(s[:, None] > 0, a * (r.to(ct) / torch.where(s > 0, s, 1))[:, None], 0))
    return q.view(gc.shape).movedim(-1, dim)


def mvue_variance(g: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """The total variance sum_i g_i^2 (1 - p_i) / p_i of "mvue" (finite g; float64 for float64 g)."""
    p = mvue_probabilities(g, n, m, dim)
    g2 = g.detach().to(p.dtype) ** 2
    return torch.where(p > 0, g2 * (1 - p) / torch.where(p > 0, p, 1), 0).sum()


def random_unbiased_variance(g: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The total variance of "random-unbiased": sum_i g_i^2 (m / n - 1) (each kept with p = n / m)."""
    g2 = g.detach().to(_compute_dtype(g.dtype)) ** 2
    return g2.sum() * (m / n - 1)
