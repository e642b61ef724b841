"""Block-sparse storage for Linear (Co x Ci) and Conv (Co x Ci x kh x kw) weights.

A block is bo output x bi input channels spanning the whole kernel (SPEC section 5). Only the
nonzero blocks are stored, in CSR order over the (Co/bo, Ci/bi) block grid:

* ``values``: (nnzb, bo, bi) for 2-D, (nnzb, bo, bi, kh, kw) for 4-D, rows then columns ascending.
* ``crow_indices``: int32 (Co/bo + 1,); block row r holds entries crow[r]:crow[r+1].
* ``col_indices``: (nnzb,) block column of each entry; int16 when Ci/bi <= 32768, else int32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..patterns.checks import check_float_tensor

__all__ = ["BlockCompressed", "compress_block"]

DEFAULT_BLOCK = (8, 8)
_INT16_COLS = 1 << 15


def _col_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= _INT16_COLS else torch.int32


def _check_block(block) -> tuple[int, int]:
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) for b in block)):
        raise TypeError(f"block must be a pair of ints (bo, bi), got {block!r}")
    if min(block) < 1:
        raise ValueError(f"block sizes must be >= 1, got block={tuple(block)}")
    return int(block[0]), int(block[1])


def _check_shape(shape: torch.Size, block: tuple[int, int], name: str) -> None:
    if len(shape) not in (2, 4):
        raise ValueError(
            f"{name} must be 2-D (Linear, Co x Ci) or 4-D (Conv, Co x Ci x kh x kw), "
            f"got shape {tuple(shape)}"
        )
    for d, what in ((0, "output channels"), (1, "input channels")):
        if shape[d] % block[d]:
            raise ValueError(
                f"dim {d} ({what}) of {name} has size {shape[d]} in shape {tuple(shape)}, which "
                f"is not divisible by block[{d}]={block[d]} of block={block}"
            )


def _block_view(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(R, C, bo, bi, *kernel) view of w (a copy when w is not viewable)."""
    (co, ci), kernel = w.shape[:2], w.shape[2:]
    bo, bi = block
    return w.reshape((co // bo, bo, ci // bi, bi) + kernel).transpose(1, 2)


@dataclass(eq=False, repr=False)
class BlockCompressed:
    """Nonzero (bo, bi[, kh, kw]) blocks of a weight in CSR order (layout: module docstring)."""

    values: torch.Tensor
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    shape: torch.Size
    block: tuple[int, int] = DEFAULT_BLOCK

    def __post_init__(self):
        self.block = _check_block(self.block)
        self.shape = torch.Size(self.shape)
        _check_shape(self.shape, self.block, "shape")
        check_float_tensor(self.values, "values")
        rows, cols = self.grid_shape
        nnzb = self.values.shape[0] if self.values.dim() else -1
        want = (nnzb,) + self.block + tuple(self.shape[2:])
        if tuple(self.values.shape) != want:
            raise ValueError(
                f"values must have shape (nnzb, {', '.join(map(str, want[1:]))}) for a weight of "
                f"shape {tuple(self.shape)} in blocks {self.block}, got {tuple(self.values.shape)}"
            )
        if (not isinstance(self.crow_indices, torch.Tensor) or self.crow_indices.dtype != torch.int32
                or tuple(self.crow_indices.shape) != (rows + 1,)):
            raise ValueError(f"crow_indices must be an int32 tensor of shape ({rows + 1},)")
        if (not isinstance(self.col_indices, torch.Tensor)
                or self.col_indices.dtype not in (torch.int16, torch.int32)
                or tuple(self.col_indices.shape) != (nnzb,)):
            raise ValueError(f"col_indices must be an int16/int32 tensor of shape ({nnzb},)")
        for name in ("crow_indices", "col_indices"):
            if getattr(self, name).device != self.values.device:
                raise ValueError(f"{name} is on {getattr(self, name).device} "
                                 f"but values on {self.values.device}")

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.shape[0] // self.block[0], self.shape[1] // self.block[1]

    @property
    def nnzb(self) -> int:
        return self.values.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of kept block values plus the CSR index arrays."""
        return sum(t.numel() * t.element_size()
                   for t in (self.values, self.crow_indices, self.col_indices))

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.values.element_size()

    @property
    def density(self) -> float:
        """Fraction of blocks kept (0.0 for a weight with no blocks)."""
        total = math.prod(self.grid_shape)
        return self.nnzb / total if total else 0.0

    def block_mask(self) -> torch.Tensor:
        """Bool (Co/bo, Ci/bi) grid, True where a block is stored."""
        grid = torch.zeros(self.grid_shape, dtype=torch.bool, device=self.device)
        grid[self._row_of_entry(), self.col_indices.long()] = True
        return grid

    def _row_of_entry(self) -> torch.Tensor:
        counts = self.crow_indices.diff().long()
        return torch.repeat_interleave(torch.arange(len(counts), device=self.device), counts)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.grid_shape
        grid = torch.zeros((rows, cols) + tuple(self.values.shape[1:]), dtype=self.dtype,
                           device=self.device)
        grid[self._row_of_entry(), self.col_indices.long()] = self.values
        return grid.transpose(1, 2).reshape(self.shape)

    def to_bsr(self) -> torch.Tensor:
        """The 2-D weight as a ``torch.sparse_bsr`` tensor (int64 indices)."""
        if len(self.shape) != 2:
            raise ValueError(f"to_bsr needs a 2-D weight, this one has shape {tuple(self.shape)}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
            # The CSR arrays come from compress_block or a validated load: skip torch's re-check.
            return torch.sparse_bsr_tensor(self.crow_indices.long(), self.col_indices.long(),
                                           self.values, size=self.shape, check_invariants=False)

    def to(self, device) -> "BlockCompressed":
        return BlockCompressed(self.values.to(device), self.crow_indices.to(device),
                               self.col_indices.to(device), self.shape, self.block)

    def _check_index_values(self) -> None:
        """Raise ValueError unless the CSR arrays describe valid, sorted block coordinates."""
        crow = self.crow_indices.long()
        if int(crow[0]) != 0 or int(crow[-1]) != self.nnzb or bool((crow.diff() < 0).any()):
            raise ValueError(f"crow_indices must rise from 0 to nnzb={self.nnzb}")
        col = self.col_indices.long()
        if col.numel() and (bool((col < 0).any()) or bool((col >= self.grid_shape[1]).any())):
            raise ValueError(f"col_indices must lie in [0, {self.grid_shape[1]})")
        # Within a row columns strictly rise; a new row may restart lower.
        step_ok = col.diff() > 0
        row_start = torch.zeros(self.nnzb, dtype=torch.bool, device=self.device)
        row_start[crow[1:-1][crow[1:-1] < self.nnzb]] = True
        if not bool((step_ok | row_start[1:]).all()):
            raise ValueError("col_indices must be strictly ascending within each block row")

    def __repr__(self) -> str:
        return (f"BlockCompressed(shape={tuple(self.shape)}, block={self.block}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})")


def compress_block(w: torch.Tensor, block=DEFAULT_BLOCK,
                   mask: torch.Tensor | None = None) -> BlockCompressed:
    """Store the blocks of w that are kept: those with any nonzero, or those True in ``mask``.

    ``mask`` is a bool (Co/bo, Ci/bi) block grid or an elementwise mask of w's shape that is
    constant within every block.
    """
    check_float_tensor(w, "w")
    block = _check_block(block)
    _check_shape(w.shape, block, "w")
    rows, cols = w.shape[0] // block[0], w.shape[1] // block[1]
    blocks = _block_view(w, block)
    if mask is None:
        keep = (blocks != 0).flatten(2).any(-1)
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor, got {got}")
        if mask.device != w.device:
            raise ValueError(f"mask is on {mask.device} but w is on {w.device}")
        if mask.shape == (rows, cols):
            keep = mask
        elif mask.shape == w.shape:
            per_block = _block_view(mask, block).flatten(2)
            keep = per_block.any(-1)
            mixed = int((keep != per_block.all(-1)).sum())
            if mixed:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} is not constant within {mixed} of the "
                    f"{rows * cols} blocks of size {block}; pass a block mask or a block-constant one"
                )
        else:
            raise ValueError(
                f"mask must have the block-grid shape {(rows, cols)} or w's shape "
                f"{tuple(w.shape)} for block={block}, got {tuple(mask.shape)}"
            )
    values = blocks[keep].contiguous()
    crow = torch.zeros(rows + 1, dtype=torch.int32, device=w.device)
    crow[1:] = keep.sum(1).cumsum(0)
    col = keep.nonzero()[:, 1].to(_col_dtype(cols))
    return BlockCompressed(values, crow, col, w.shape, block)
