"""Compressed N:M storage: the n kept values of every group of m plus their bit-packed positions.

Layout, for a dense tensor x of shape S grouped along ``dim`` (size L = groups * m):

* ``values``: shape ``S`` with ``dim`` removed, then ``(groups, n)`` appended, i.e. the shape of
  ``x.movedim(dim, -1)`` with its last size L replaced by ``(L // m, n)``; same dtype as x.
* ``indices``: 1-D uint8, the positions (0..m-1, ascending within each group) of the values in
  ``values.reshape(-1)`` order, packed by ``pack_bits`` at ``ceil(log2(m))`` bits each (none for
  m == 1), so ``ceil(values.numel() * bits / 8)`` bytes.

Dropped entries come back as +0.0, so a -0.0 that was not kept comes back as +0.0 (kept values,
-0.0 included, are bit-exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..patterns.checks import check_dim, check_divisible, check_float_tensor, check_nm
from ..patterns.nm import nm_mask
from .bits import MAX_BITS, index_bits, pack_bits, packed_nbytes, unpack_bits

__all__ = ["NMCompressed", "compress_nm", "pack_bits", "unpack_bits", "index_bits"]

MAX_M = 1 << MAX_BITS


def _check_m(m: int) -> None:
    if m > MAX_M:
        raise ValueError(f"m must be <= {MAX_M} for uint8 packed positions, got m={m}")


def _values_shape(shape: torch.Size, dim: int, n: int, m: int) -> torch.Size:
    lead = tuple(shape[:dim]) + tuple(shape[dim + 1:])
    return torch.Size(lead + (shape[dim] // m, n))


@dataclass(eq=False, repr=False)
class NMCompressed:
    """An N:M sparse tensor as kept values plus packed in-group positions (layout: module docstring)."""

    values: torch.Tensor
    indices: torch.Tensor
    n: int
    m: int
    dim: int
    shape: torch.Size

    def __post_init__(self):
        self.n, self.m = check_nm(self.n, self.m)
        _check_m(self.m)
        self.shape = torch.Size(self.shape)
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise TypeError(f"dim must be an int, got {self.dim!r}")
        if not -len(self.shape) <= self.dim < len(self.shape):
            raise ValueError(f"dim={self.dim} is out of range for shape {tuple(self.shape)}")
        self.dim %= len(self.shape)
        check_divisible(self.shape[self.dim], self.m, f"dim {self.dim}", self.shape)
        check_float_tensor(self.values, "values")
        want = _values_shape(self.shape, self.dim, self.n, self.m)
        if self.values.shape != want:
            raise ValueError(
                f"values must have shape {tuple(want)} for a {self.n}:{self.m} tensor of shape "
                f"{tuple(self.shape)} grouped along dim {self.dim}, got {tuple(self.values.shape)}"
            )
        if not isinstance(self.indices, torch.Tensor) or self.indices.dtype != torch.uint8:
            raise TypeError("indices must be a uint8 tensor of packed positions")
        need = packed_nbytes(self.values.numel(), self.bits)
        if self.indices.dim() != 1 or self.indices.numel() != need:
            raise ValueError(
                f"indices must be 1-D with {need} bytes ({self.values.numel()} positions of "
                f"{self.bits} bits), got shape {tuple(self.indices.shape)}"
            )
        if self.indices.device != self.values.device:
            raise ValueError(
                f"indices are on {self.indices.device} but values on {self.values.device}"
            )

    @property
    def bits(self) -> int:
        return index_bits(self.m)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of kept values plus packed positions."""
        return self.values.numel() * self.values.element_size() + self.indices.numel()

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.values.element_size()

    def positions(self) -> torch.Tensor:
        """Unpacked in-group positions as uint8, shaped like ``values``."""
        return unpack_bits(self.indices, self.bits, self.values.numel()).view(self.values.shape)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.values.shape[:-1] + (self.m,), dtype=self.dtype, device=self.device)
        dense.scatter_(-1, self.positions().to(torch.int64), self.values)
        moved = dense.reshape(self.values.shape[:-2] + (self.shape[self.dim],))
        return moved.movedim(-1, self.dim).contiguous()

    def to(self, device) -> "NMCompressed":
        return NMCompressed(self.values.to(device), self.indices.to(device), self.n, self.m,
                            self.dim, self.shape)

    def _check_positions(self) -> None:
        """Raise ValueError unless every group's positions are < m and strictly ascending."""
        pos = self.positions()
        if pos.numel() and bool((pos >= self.m).any()):
            raise ValueError(f"indices hold a position >= m={self.m}")
        if self.n > 1 and not bool((pos[..., 1:] > pos[..., :-1]).all()):
            raise ValueError("indices are not strictly ascending within every group")

    def __repr__(self) -> str:
        return (f"NMCompressed(n={self.n}, m={self.m}, dim={self.dim}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})")


def _check_mask(mask, x: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")


def compress_nm(x: torch.Tensor, n: int, m: int, dim: int = -1,
                mask: torch.Tensor | None = None) -> NMCompressed:
    """Compress x to n:m along dim, keeping x where ``mask`` (exactly n True per group of m).

    Without a mask, x must already hold at most n nonzeros per group (else ValueError: prune
    first or pass mask=); never drops a nonzero silently.
    """
    check_float_tensor(x, "x")
    n, m = check_nm(n, m)
    _check_m(m)
    d = check_dim(x, dim)
    check_divisible(x.shape[d], m, f"dim {dim} of x", x.shape)
    moved = x.movedim(d, -1)
    grouped_shape = moved.shape[:-1] + (moved.shape[-1] // m, m)
    grouped = moved.reshape(grouped_shape)
    if mask is None:
        nonzeros = (grouped != 0).sum(-1)
        bad = int((nonzeros > n).sum())
        if bad:
            raise ValueError(
                f"x has {bad} of {nonzeros.numel()} groups of m={m} along dim {dim} with more than "
                f"n={n} nonzeros (shape {tuple(x.shape)}); prune first, e.g. "
                f"x * nm_mask(x, {n}, {m}, dim={dim}), or pass mask= to choose the kept entries"
            )
        kept = nm_mask(moved, n, m, -1).reshape(grouped_shape)
    else:
        _check_mask(mask, x)
        if mask.shape != x.shape:
            raise ValueError(
                f"mask must have x's shape {tuple(x.shape)}, got {tuple(mask.shape)}"
            )
        kept = mask.movedim(d, -1).reshape(grouped_shape)
        bad = int((kept.sum(-1) != n).sum())
        if bad:
            raise ValueError(
                f"mask has {bad} groups of m={m} along dim {dim} that do not keep exactly n={n} "
                f"entries (shape {tuple(mask.shape)})"
            )
    # Boolean indexing walks the groups in row-major order, so positions come out ascending.
    values = grouped[kept].reshape(grouped_shape[:-1] + (n,))
    pos = torch.arange(m, dtype=torch.uint8, device=x.device).expand(grouped_shape)[kept]
    return NMCompressed(values, pack_bits(pos, index_bits(m)), n, m, d, x.shape)
