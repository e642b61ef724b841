"""Mask math on plain tensors: N:M, transposable N:M, blocks, and mask diversity."""

from .nm import is_nm, nm_mask
from .transposable import conv_from_2d, conv_to_2d, is_transposable, transposable_mask

__all__ = ["nm_mask", "is_nm", "transposable_mask", "is_transposable", "conv_to_2d", "conv_from_2d"]
