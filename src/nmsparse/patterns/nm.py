"""N:M masks: exactly n kept entries in every group of m consecutive elements along one dim."""

from __future__ import annotations

import math

import torch

from .checks import check_dim, check_divisible, check_float_tensor, check_nm

METHODS = ("magnitude", "random")

# CPU work is done in slices of this many groups so the temporaries stay in cache; allocating
# fresh 64 MB temporaries costs more in page faults than the comparisons themselves.
_CPU_CHUNK_GROUPS = 1 << 18
# Up to this m, ranking by pairwise comparison (m(m-1)/2 vector compares) beats a sort.
_PAIRWISE_MAX_M = 16


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN mapped to +inf, so NaN and inf both rank as the largest magnitude."""
    return torch.abs(x).nan_to_num_(nan=math.inf, posinf=math.inf)


def topn_in_groups(keys: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the n largest keys in each row of a (groups, m) tensor.

    Ties go to the earlier position, so the result is a deterministic function of the keys.
    NaN keys must be removed by the caller (see ``magnitude_key``).
    """
    groups, m = keys.shape
    if out is None:
        out = torch.empty((groups, m), dtype=torch.bool, device=keys.device)
    if n == 0 or n == m:
        return out.fill_(n == m)
    if m > _PAIRWISE_MAX_M:
        idx = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :n]
        return out.zero_().scatter_(1, idx, True)
    rank = torch.zeros((m, groups), dtype=torch.int8, device=keys.device)
    beat = torch.empty(groups, dtype=torch.bool, device=keys.device)
    for i in range(m):
        for j in range(i + 1, m):
            torch.ge(keys[:, i], keys[:, j], out=beat)  # i keeps its place on ties
            rank[j].add_(beat)
            rank[i].sub_(beat.view(torch.int8))
    # rank[i] now holds (#earlier j beating i) - (#later j that i beats); the true rank adds
    # the m-1-i later positions, so "rank < n" becomes rank[i] < n - (m-1-i).
    for i in range(m):
        torch.lt(rank[i], n - (m - 1 - i), out=out[:, i])
    return out


def _grouped_mask(x: torch.Tensor, n: int, m: int, method: str, generator) -> torch.Tensor:
    """Mask for a contiguous tensor whose last dim is grouped by m."""
    flat = x.reshape(-1, m)
    groups = flat.shape[0]
    out = torch.empty((groups, m), dtype=torch.bool, device=x.device)
    if method == "random":
        keys = torch.rand(flat.shape, generator=generator, device=x.device, dtype=torch.float32)
        return topn_in_groups(keys, n, out=out).view(x.shape)
    chunk = groups if x.device.type != "cpu" else _CPU_CHUNK_GROUPS
    buf = torch.empty((min(chunk, groups), m), dtype=x.dtype, device=x.device)
    for s in range(0, groups, chunk):
        e = min(groups, s + chunk)
        keys = torch.abs(flat[s:e], out=buf[: e - s]).nan_to_num_(nan=math.inf, posinf=math.inf)
        topn_in_groups(keys, n, out=out[s:e])
    return out.view(x.shape)


def nm_mask(x: torch.Tensor, n: int, m: int, dim: int = -1, method: str = "magnitude",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask of x's shape with exactly n True in every group of m consecutive elements along dim.

    method="magnitude" keeps the n largest |x| (NaN and inf count as largest; ties go to the
    earlier position). method="random" keeps n uniformly chosen positions, reproducible from
    ``generator`` (which must live on x's device).
    """
    check_float_tensor(x, "x")
    n, m = check_nm(n, m)
    d = check_dim(x, dim)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_divisible(x.shape[d], m, f"dim {dim}", x.shape)
    return nm_mask_checked(x, n, m, d, method, generator)


def nm_mask_checked(x: torch.Tensor, n: int, m: int, d: int, method: str = "magnitude",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """``nm_mask`` for arguments already validated (d non-negative): the per-step path of layers that
    checked their settings and weight shape once, when they were built."""
    moved = x.movedim(d, -1).contiguous()
    return _grouped_mask(moved, n, m, method, generator).movedim(-1, d)


def is_nm(mask: torch.Tensor, n: int, m: int, dim: int = -1, exact: bool = True) -> bool:
    """True if every group of m along dim holds exactly n (or, exact=False, at most n) True/nonzeros."""
    n, m = check_nm(n, m)
    d = check_dim(mask, dim)
    if mask.shape[d] % m:
        return False
    counts = (mask != 0).movedim(d, -1).reshape(-1, m).sum(-1)
    return bool((counts == n).all() if exact else (counts <= n).all())
