"""The random methods' uniforms (kernels.draws): the word-to-uniform rule, range, reproducibility, uniformity."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse.kernels.draws import draw_words, uniforms, words_to_uniforms


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=20), st.data())
def test_words_to_uniforms_takes_bits_0_23_then_24_47(words, data):
    count = data.draw(st.integers(0, 2 * len(words)))
    got = words_to_uniforms(torch.tensor(words, dtype=torch.int64), count)
    want = [((w % 2**64) >> shift & 0xFFFFFF) / 2**24 for w in words for shift in (0, 24)][:count]
    assert got.dtype == torch.float32 and got.tolist() == want


@given(st.lists(st.integers(1, 5), min_size=0, max_size=3), st.integers(0, 2**31 - 1))
def test_cpu_uniforms_shape_range_and_reproducibility(shape, seed):
    a = uniforms(shape, torch.Generator().manual_seed(seed), torch.device("cpu"))
    b = uniforms(shape, torch.Generator().manual_seed(seed), "cpu")
    assert a.shape == tuple(shape) and a.dtype == torch.float32 and torch.equal(a, b)
    assert bool(((a >= 0) & (a < 1)).all())


def test_cpu_uniforms_advance_the_generator_by_their_words():
    gen = torch.Generator().manual_seed(3)
    first = uniforms((5,), gen, "cpu")
    second = uniforms((5,), gen, "cpu")
    assert not torch.equal(first, second)
    words = draw_words(10, torch.Generator().manual_seed(3))  # 5 words: 3 then 3 (the odd count rounds up)
    assert words.shape == (5,)
    assert torch.equal(first, words_to_uniforms(words[:3], 5))


def test_cpu_uniforms_are_uniform():
    """Kolmogorov-Smirnov distance to U[0, 1) of 200k draws (critical value at 1e-6: 2.7 / sqrt(n)),
    and the two halves of each word independent (their correlation within 5 standard errors)."""
    n = 200_000
    u = uniforms((n,), torch.Generator().manual_seed(0), "cpu").double()
    s, _ = u.sort()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((grid - s).abs().max(), (s - (grid - 1 / n)).abs().max()).item()
    assert ks < 2.7 / math.sqrt(n)
    lo, hi = u[0::2] - 0.5, u[1::2] - 0.5
    corr = (lo * hi).mean() / (lo.std() * hi.std())
    assert abs(corr.item()) < 5 / math.sqrt(n / 2)
