"""Compressed storage for N:M and block-sparse tensors: pack/unpack, size accounting, save/load."""

__all__: list[str] = []
