"""Mask math on plain tensors: N:M, transposable N:M, blocks, and mask diversity."""

from .block import block_mask, block_scores, expand_block_grid, global_block_mask
from .diversity import SAD, mask_diversity, sad, transposable_count
from .nm import is_nm, nm_mask
from .transposable import conv_from_2d, conv_to_2d, is_transposable, transposable_mask

__all__ = [
    "nm_mask", "is_nm", "transposable_mask", "is_transposable", "conv_to_2d", "conv_from_2d",
    "block_scores", "block_mask", "global_block_mask", "expand_block_grid",
    "transposable_count", "mask_diversity", "sad", "SAD",
]
