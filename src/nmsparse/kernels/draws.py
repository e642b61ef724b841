"""The uniforms of SDGP's random methods ("random", "random-unbiased", "mvue") on the torch path and the CPU kernel.

On a CPU, ``torch.rand`` costs about 7 ns per float32 on one core (measured on the CI machine): as much
as the whole one-pass prune it feeds. Drawing 64-bit words costs about 2 ns per two values, so on the
CPU each word of the layer's generator gives two 24-bit uniforms, k / 2**24 with k its bits 0-23 and
24-47 (``torch.empty(.., int64).random_`` draws from [0, 2**63)); the torch path converts the words
with tensor ops (``words_to_uniforms``) and the kernel reads the same words (``csrc/nm_prune.cpp``,
``draw``), so both give the same values from the same generator state. Other devices draw
``torch.rand`` (their generators are fast). The resolution, 2**-24, is torch.rand's own.
"""

from __future__ import annotations

import math

import torch

__all__ = ["uniforms", "draw_words", "words_to_uniforms"]

BITS = 24


def draw_words(count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The int64 words (CPU) that hold `count` uniforms, two per word."""
    return torch.empty((count + 1) // 2, dtype=torch.int64).random_(generator=generator)


def words_to_uniforms(words: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` float32 uniforms in [0, 1) that ``words`` hold: word i gives entries 2i and 2i + 1."""
    low = (1 << BITS) - 1
    ints = torch.stack([words & low, (words >> BITS) & low], -1).flatten()[:count]
    return ints.to(torch.float32) * (2.0 ** -BITS)  # exact: 24-bit integers and a power of two


def uniforms(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 uniforms in [0, 1) of `shape` from `generator`: ``draw_words`` on the CPU, torch.rand elsewhere."""
    if torch.device(device).type != "cpu":
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    count = math.prod(shape)
    return words_to_uniforms(draw_words(count, generator), count).view(shape)
