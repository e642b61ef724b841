"""Mask diversity (Hubara et al., 2021) and sparse architecture divergence (Zhou et al., 2021).

Mask diversity is the log (natural) of the number of masks a sparsity pattern allows,
per element: the more masks, the more freedom training has to keep the important weights.
SAD counts the entries where two masks differ, e.g. between two points of training.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import NamedTuple

import torch

from .checks import check_nm

PATTERNS = ("unstructured", "nm", "transposable", "block")

# The DP for K(m, n) visits at most C(m + k, k) states, k = min(n, m - n), at 5-10 us each:
# this bound keeps it under ~1 s on one core and admits every m <= 14.
_MAX_DP_STATES = 120_000
_SHORTCUT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(-[tT])?\s*$")


def transposable_count(n: int, m: int) -> int:
    """K(m, n): the number of m x m 0/1 matrices with exactly n ones in every row and column (exact int).

    K(4, 2) = 90, K(8, 4) = 116,963,796,250 (K(8, 4) in about 1 ms). Works for every m <= 14;
    beyond, while C(m + k, k) <= 120,000 with k = min(n, m - n) (m = 16 with k <= 6, m = 100
    with k <= 2), which keeps it under about a second; larger cases raise ValueError.
    """
    n_in, m = check_nm(n, m)
    n = min(n_in, m - n_in)  # complementing a matrix maps K(m, n) onto K(m, m - n)
    if n == 0:
        return 1
    bound = math.comb(m + n, n)
    if bound > _MAX_DP_STATES:
        raise ValueError(
            f"transposable_count(n={n_in}, m={m}) would visit up to {bound:,} DP states (limit "
            f"{_MAX_DP_STATES:,}, about a second): every m <= 14 works, larger m only with "
            f"min(n, m - n) small"
        )
    # State: how many columns still need 0, 1, ..., n ones (columns at one level are
    # interchangeable). Each row is placed level by level, lowest level first, choosing j of
    # the s[k] columns at level k in C(s[k], j) ways and moving them to level k - 1; as that
    # level is already done, no column gets two ones from one row.
    states = {(0,) * n + (m,): 1}
    for _ in range(m):
        cur = {(s, n): c for s, c in states.items()}
        for k in range(1, n + 1):
            nxt = defaultdict(int)
            for (s, left), c in cur.items():
                higher = sum(s[k + 1:])  # what levels above k can still take in this row
                for j in range(max(0, left - higher), min(left, s[k]) + 1):
                    t = s
                    if j:
                        t = list(s)
                        t[k] -= j
                        t[k - 1] += j
                        t = tuple(t)
                    nxt[(t, left - j)] += c * math.comb(s[k], j)
            cur = nxt
        states = {s: c for (s, _), c in cur.items()}
    return states[(m,) + (0,) * n]


def _entropy(d: float) -> float:
    """Binary entropy in nats: the limit of log C(T, dT) / T."""
    if d in (0.0, 1.0):
        return 0.0
    return -d * math.log(d) - (1 - d) * math.log1p(-d)


def _log_comb(total: int, k: int) -> float:
    return math.lgamma(total + 1) - math.lgamma(k + 1) - math.lgamma(total - k + 1)


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in [0, 1], got {density!r}")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return float(density)


def _check_numel(numel, multiple: int, what: str) -> int | None:
    if numel is None:
        return None
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be a positive int or None (the large-T limit), got {numel!r}")
    if numel % multiple:
        raise ValueError(f"numel={numel} must be a multiple of {multiple} ({what})")
    return numel


def _block_elems(block) -> int:
    if isinstance(block, (tuple, list)) and len(block) == 2:
        ok = all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        if ok:
            return block[0] * block[1]
    elif isinstance(block, int) and not isinstance(block, bool) and block > 0:
        return block
    raise ValueError(f"block must be a positive int (elements per block) or a pair (rows, cols), got {block!r}")


def mask_diversity(pattern: str, *, density: float | None = None, n: int | None = None,
                   m: int | None = None, block=None, numel: int | None = None) -> float:
    """Log (natural) number of allowed masks per element for a sparsity pattern.

    pattern is "unstructured" (needs density), "nm" (n, m), "transposable" (n, m), "block"
    (density and block: elements per block, or a (rows, cols) pair), or a shortcut "N:M" /
    "N:M-T" for nm / transposable. numel=None gives the large-tensor limit (binary entropy
    H(d), or H(d)/B for blocks); a finite numel T uses exact log binomials with round(dT)
    kept entries (round(dT/B) kept blocks). N:M and transposable values do not depend on T.
    At 50%: unstructured 0.693, 4:8 0.531, 2:4 0.448, 4:8-T 0.398, 2:4-T 0.281.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    short = _SHORTCUT.match(pattern)
    if short:
        sn, sm = int(short.group(1)), int(short.group(2))
        if (n is not None and n != sn) or (m is not None and m != sm):
            raise ValueError(f"pattern {pattern!r} conflicts with n={n}, m={m}")
        n, m = sn, sm
        pattern = "transposable" if short.group(3) else "nm"
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS} or a shortcut like '2:4' or '4:8-T', got {pattern!r}")

    if pattern in ("nm", "transposable"):
        if n is None or m is None:
            raise ValueError(f"pattern {pattern!r} needs n and m, got n={n}, m={m}")
        n, m = check_nm(n, m)
        if density is not None and not math.isclose(_check_density(density), n / m):
            raise ValueError(f"density={density} conflicts with {n}:{m} (density {n / m})")
        if pattern == "nm":
            _check_numel(numel, m, f"whole groups of m={m}")
            return math.log(math.comb(m, n)) / m
        _check_numel(numel, m * m, f"whole {m}x{m} tiles")
        return math.log(transposable_count(n, m)) / (m * m)

    if density is None:
        raise ValueError(f"pattern {pattern!r} needs a density in [0, 1]")
    d = _check_density(density)
    size = 1
    if pattern == "block":
        if block is None:
            raise ValueError("pattern 'block' needs block (elements per block, e.g. 64, or a pair like (8, 8))")
        size = _block_elems(block)
    t = _check_numel(numel, size, f"whole blocks of {size} elements")
    if t is None:
        return _entropy(d) / size
    units = t // size
    return _log_comb(units, round(d * units)) / t


class SAD(NamedTuple):
    """Sparse architecture divergence: entries where two masks differ, as a count and a fraction."""

    count: int
    fraction: float


def _as_mask(x) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(x)) != 0


def sad(mask_a, mask_b) -> SAD:
    """Entries where two masks differ (nonzero = kept); dicts of masks with the same keys are summed."""
    if isinstance(mask_a, dict) or isinstance(mask_b, dict):
        if not (isinstance(mask_a, dict) and isinstance(mask_b, dict)):
            raise TypeError("sad: both arguments must be dicts of masks, or neither")
        if set(mask_a) != set(mask_b):
            raise ValueError(f"sad: the dicts have different keys: {sorted(map(str, set(mask_a) ^ set(mask_b)))}")
        parts = [_sad_one(mask_a[k], mask_b[k], f"[{k!r}]") for k in mask_a]
    else:
        parts = [_sad_one(mask_a, mask_b, "")]
    count = sum(c for c, _ in parts)
    total = sum(t for _, t in parts)
    return SAD(count, count / total if total else 0.0)


def _sad_one(a, b, key: str) -> tuple[int, int]:
    a, b = _as_mask(a), _as_mask(b)
    if a.shape != b.shape:
        raise ValueError(f"sad: mask_a{key} has shape {tuple(a.shape)} but mask_b{key} has shape {tuple(b.shape)}")
    return int((a != b.to(a.device)).sum()), a.numel()
