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

An SDGP layer on the CPU hands its backward a key TENSOR instead of a generator: ``step_key(seed, step)``, a
hash of its seed and its step counter inside one custom op, so torch.compile keeps it in the graph (a
generator cannot enter a graph: it broke the graph at every layer) and eager runs compute the same key.
Every function here that takes a generator also takes such a key.
"""

from __future__ import annotations

import math

import torch

__all__ = ["uniforms", "draw_key", "hashed_uniforms", "hash32", "step_key", "step_key_advance", "BITS"]

BITS = 24
_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0x21F0AAAD, 0xD35A2D97)


_STEP_SALT = 0x9E3779B9  # makes the key's high word another hash than its low word


def draw_key(generator: torch.Generator | torch.Tensor | None = None) -> int:
    """The key of a call's uniforms, in [0, 2**63): one word of `generator` (CPU), or the value of a key tensor."""
    if isinstance(generator, torch.Tensor):
        return int(generator)
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


def _hash32_int(x: int) -> int:
    """hash32 of a Python int in [0, 2**32)."""
    x ^= x >> 16
    x = (x * _MULTIPLIERS[0]) & _MASK32
    x ^= x >> 15
    x = (x * _MULTIPLIERS[1]) & _MASK32
    return x ^ (x >> 15)


@torch.library.custom_op("nmsparse::step_key_advance", mutates_args=())
def _step_key_op(step: torch.Tensor, base_lo: int, base_hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key of `step`, step + 1) as one opaque op, computed on Python integers when it runs. The next step is what
    the layer writes back to its counter, so the op runs in a compiled forward and its key is saved for the
    backward. (Computed apart from the increment, AOTAutograd moved the key into the backward, where it read the
    counter the forward had already advanced: the backward drew the next step's choice, and two forwards before
    a backward failed autograd's version check.)"""
    v = (((base_hi << 32) | base_lo) + int(step)) % (1 << 64)
    lo, hi = v & _MASK32, v >> 32
    lo2 = _hash32_int(_hash32_int(lo) ^ hi)
    key = ((_hash32_int(lo2 ^ _STEP_SALT ^ hi) & 0x7FFFFFFF) << 32) | lo2
    return torch.tensor(key, dtype=torch.int64, device=step.device), step + 1


@_step_key_op.register_fake
def _step_key_fake(step, base_lo, base_hi):
    return torch.empty((), dtype=torch.int64, device=step.device), torch.empty_like(step)


def step_key_advance(seed: int, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``step_key(seed, step)``, step + 1) in one op that torch.compile keeps in the forward graph."""
    from .reference import SEED_STRIDE

    base = (seed * SEED_STRIDE) % (1 << 64)
    return _step_key_op(step, base & _MASK32, base >> 32)


def step_key(seed: int, step: torch.Tensor) -> torch.Tensor:
    """The key (0-d int64 tensor in [0, 2**63)) of an SDGP layer's backward number `step` (0-d int64, >= 0): with
    v = (seed * SEED_STRIDE + step) mod 2**64 in 32-bit words (lo, hi), key = hash32(lo2 ^ SALT ^ hi) << 32 (top
    bit cleared) | lo2, where lo2 = hash32(hash32(lo) ^ hi)."""
    return step_key_advance(seed, step)[0]


def _signed32(c: int) -> int:
    """The int32 with the bits of c (0 <= c < 2**32)."""
    return (c ^ 0x80000000) - 0x80000000


def _mix(x: torch.Tensor) -> torch.Tensor:
    """hash32 of a fresh int32 tensor, in place: int32 products wrap modulo 2**32, and a right shift of a signed
    int is arithmetic, so each shift is masked to its logical value (the torch path runs this where the kernel
    cannot; in place, as allocating each pass's result cost more than the arithmetic)."""
    t = torch.empty_like(x)
    for shift, mult in ((16, _MULTIPLIERS[0]), (15, _MULTIPLIERS[1]), (15, None)):
        torch.bitwise_right_shift(x, shift, out=t)
        x ^= t.bitwise_and_((1 << (32 - shift)) - 1)
        if mult is not None:
            x *= _signed32(mult)
    return x


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit mix of each entry of x (int64 in [0, 2**32)): x ^= x >> 16; x *= c0; x ^= x >> 15; x *= c1; x ^= x >> 15."""
    return _mix(x.to(torch.int32, copy=True)).to(torch.int64) & _MASK32  # a copy: _mix works in place


def hashed_uniforms(key: int, count: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """Uniforms number start .. start + count - 1 of `key` (float32 in [0, 1)), as the kernel computes them."""
    lo, hi = _signed32(key & _MASK32), _signed32((key >> 32) & _MASK32)
    if start + count <= 1 << 31:  # every counter fits an int32 (its high word is 0)
        low, high = torch.arange(start, start + count, dtype=torch.int32, device=device), hi
    else:
        e = torch.arange(start, start + count, dtype=torch.int64, device=device)
        low, high = (e & _MASK32).to(torch.int32), (e >> 32).to(torch.int32) ^ hi
    x = _mix(_mix(low ^ lo).bitwise_xor_(high))
    return ((x >> (32 - BITS)) & ((1 << BITS) - 1)).to(torch.float32) * (2.0 ** -BITS)  # exact: 24-bit integers


def uniforms(shape, generator: torch.Generator | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """float32 uniforms in [0, 1) of `shape` from `generator`: ``hashed_uniforms`` of one key on the CPU (or of a
    key tensor, on any device), torch.rand elsewhere."""
    if isinstance(generator, torch.Tensor):
        return hashed_uniforms(draw_key(generator), math.prod(shape), device).view(shape)
    if torch.device(device).type != "cpu":
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return hashed_uniforms(draw_key(generator), math.prod(shape)).view(shape)
