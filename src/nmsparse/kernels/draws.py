"""The uniforms of SDGP's random methods ("random", "random-unbiased", "mvue") on the torch path and the CPU kernel.

On a CPU, PyTorch's generator (a Mersenne twister) costs 4-7 ns per value on a core (``torch.rand``, or
``random_`` words split in two; measured on the CI machine): more than the one-pass prune it feeds. So on
the CPU a call draws ONE 64-bit word from the layer's generator, the key, and uniform number e is a hash
of (key, e): ``hash32(hash32(lo(e) ^ lo(key)) ^ hi(e) ^ hi(key))``, its top 24 bits times 2**-24 (the
resolution of torch.rand). ``hash32`` is a bijective xorshift-multiply mix of 32-bit words (two rounds,
constants 0x21f0aaad and 0xd35a2d97 from Wellons' hash search), so for one key the first 2**32 uniforms
come from distinct words. The kernel computes it in vector lanes (``csrc/nm_prune.cpp``, ``draw``); the
torch path computes it with int64 tensor ops (``hashed_uniforms``), so both give the same values from the
same generator state. Other devices draw ``torch.rand`` (their generators are fast).
"""

from __future__ import annotations

import math

import torch

__all__ = ["uniforms", "draw_key", "hashed_uniforms", "hash32", "BITS"]

BITS = 24
_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0x21F0AAAD, 0xD35A2D97)


def draw_key(generator: torch.Generator | None = None) -> int:
    """One word of `generator` (CPU): the key of a call's uniforms, in [0, 2**63)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), exact in int64: c split in 16-bit halves so no product passes 2**48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit mix of each entry of x (int64 in [0, 2**32)): x ^= x >> 16; x *= c0; x ^= x >> 15; x *= c1; x ^= x >> 15."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MULTIPLIERS[1])
    return x ^ (x >> 15)


def hashed_uniforms(key: int, count: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """Uniforms number start .. start + count - 1 of `key` (float32 in [0, 1)), as the kernel computes them."""
    e = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = hash32((e & _MASK32) ^ (key & _MASK32))
    x = hash32(x ^ (e >> 32) ^ ((key >> 32) & _MASK32))
    return (x >> (32 - BITS)).to(torch.float32) * (2.0 ** -BITS)  # exact: 24-bit integers and a power of two


def uniforms(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 uniforms in [0, 1) of `shape` from `generator`: ``hashed_uniforms`` of one key on the CPU,
    torch.rand elsewhere."""
    if torch.device(device).type != "cpu":
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return hashed_uniforms(draw_key(generator), math.prod(shape)).view(shape)
