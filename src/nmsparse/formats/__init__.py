"""Compressed storage for N:M and block-sparse tensors: pack/unpack, size accounting, save/load."""

from .block import BlockCompressed, compress_block
from .io import load, save, size_report
from .nm import NMCompressed, compress_nm

__all__ = ["NMCompressed", "compress_nm", "BlockCompressed", "compress_block", "save", "load",
           "size_report"]
