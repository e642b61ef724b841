"""Pure-torch packing of small unsigned integers (0..2**bits - 1) into a dense uint8 bit stream.

Layout: little-endian bit stream. Value k occupies stream bits [k*bits, (k+1)*bits), least
significant bit first, and stream bit b is bit (b % 8) of byte b // 8. The stream is padded
with zero bits to a whole byte, so ``count`` values take ``ceil(count * bits / 8)`` bytes.
"""

from __future__ import annotations

import torch

MAX_BITS = 8


def index_bits(m: int) -> int:
    """Bits needed to store a position in a group of m: ceil(log2(m)), 0 for m == 1."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive int, got {m!r}")
    return (m - 1).bit_length()


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` values of ``bits`` bits each."""
    return (count * bits + 7) // 8


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {bits!r}")
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [0, {MAX_BITS}], got bits={bits}")
    return bits


def pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a uint8 tensor of values < 2**bits (any shape, read flat) into a 1-D uint8 tensor."""
    bits = _check_bits(bits)
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.uint8:
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"idx must be a uint8 tensor, got {got}")
    flat = idx.reshape(-1)
    count = flat.numel()
    nbytes = packed_nbytes(count, bits)
    if bits == 0 or count == 0:
        return torch.zeros(nbytes, dtype=torch.uint8, device=idx.device)
    if bits == MAX_BITS:
        return flat.clone()
    if bool((flat >> bits).any()):
        raise ValueError(f"idx holds a value >= 2**bits = {1 << bits}; cannot pack it in {bits} bits")
    # 8 values of `bits` bits make exactly `bits` bytes: gather each run of 8 into one int64
    # word (at most 56 bits for bits <= 7, so no sign trouble), then cut it into `bits` bytes.
    pad = (-count) % 8
    words = torch.nn.functional.pad(flat, (0, pad)).view(-1, 8).to(torch.int64)
    shifts = torch.arange(8, device=idx.device, dtype=torch.int64) * bits
    word = (words << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, device=idx.device, dtype=torch.int64) * 8
    out = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[:nbytes].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` values of the stream as a 1-D uint8 tensor."""
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 tensor, got {got}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    flat = packed.reshape(-1)
    need = packed_nbytes(count, bits)
    if flat.numel() < need:
        raise ValueError(
            f"packed has {flat.numel()} bytes but {count} values of {bits} bits need {need}"
        )
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.uint8, device=packed.device)
    flat = flat[:need]
    if bits == MAX_BITS:
        return flat.clone()
    pad = (-need) % bits
    chunks = torch.nn.functional.pad(flat, (0, pad)).view(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (chunks << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    out = ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
    return out[:count].contiguous()
