"""The random methods' uniforms (kernels.draws): the hash against plain integers, range, reproducibility,
one generator word per call, uniformity and independence."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import M32, plain_hash32, plain_step_key, plain_uniform
from nmsparse.kernels.draws import draw_key, hash32, hashed_uniforms, step_key, step_key_advance, uniforms

@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, M32), min_size=1, max_size=50))
def test_hash32_matches_plain_integers(xs):
    assert hash32(torch.tensor(xs, dtype=torch.int64)).tolist() == [plain_hash32(x) for x in xs]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**63 - 1), st.integers(0, 40), st.integers(0, 2**40))
def test_hashed_uniforms_match_plain_integers(key, count, start):
    got = hashed_uniforms(key, count, start=start)
    assert got.dtype == torch.float32
    assert got.tolist() == [plain_uniform(key, e) for e in range(start, start + count)]


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(0, 2**20), st.integers(-2**80, 2**80)), st.integers(0, 2**63 - 1))
def test_step_key_matches_plain_integers(seed, step):
    key, nxt = step_key_advance(seed, torch.tensor(step))
    assert key.dtype == torch.int64 and key.shape == () and int(key) == plain_step_key(seed, step)
    assert 0 <= int(key) < 2**63 and int(step_key(seed, torch.tensor(step))) == int(key)
    if step < 2**63 - 1:
        assert int(nxt) == step + 1


def test_step_keys_of_consecutive_steps_and_seeds_differ():
    keys = {int(step_key(seed, torch.tensor(step))) for seed in range(20) for step in range(500)}
    assert len(keys) == 20 * 500


def test_a_key_tensor_gives_its_hashed_uniforms_on_any_call():
    key = step_key(3, torch.tensor(7))
    u = uniforms((4, 5), key, "cpu")
    assert draw_key(key) == int(key) and torch.equal(u, hashed_uniforms(int(key), 20).view(4, 5))
    assert torch.equal(u, uniforms((4, 5), key, "cpu"))  # a key is a value, not a stream


def test_hash32_is_a_bijection_on_a_million_counters():
    out = hash32(torch.arange(1 << 20, dtype=torch.int64) ^ 0x5BD1E995)
    assert out.unique().numel() == 1 << 20 and int(out.min()) >= 0 and int(out.max()) <= M32


@given(st.lists(st.integers(1, 5), min_size=0, max_size=3), st.integers(0, 2**31 - 1))
def test_cpu_uniforms_shape_range_and_reproducibility(shape, seed):
    a = uniforms(shape, torch.Generator().manual_seed(seed), torch.device("cpu"))
    b = uniforms(shape, torch.Generator().manual_seed(seed), "cpu")
    assert a.shape == tuple(shape) and a.dtype == torch.float32 and torch.equal(a, b)
    assert bool(((a >= 0) & (a < 1)).all())


def test_a_call_takes_one_word_of_the_generator():
    gen = torch.Generator().manual_seed(3)
    first = uniforms((5,), gen, "cpu")
    second = uniforms((1000,), gen, "cpu")
    words = torch.empty(2, dtype=torch.int64).random_(generator=torch.Generator().manual_seed(3)).tolist()
    assert torch.equal(first, hashed_uniforms(words[0], 5)) and torch.equal(second, hashed_uniforms(words[1], 1000))
    assert draw_key(torch.Generator().manual_seed(3)) == words[0]
    assert not torch.equal(first, second[:5])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).mean() / (a.std() * b.std())).item()


def test_cpu_uniforms_are_uniform_and_independent():
    """Kolmogorov-Smirnov distance to U[0, 1) of 200k draws (critical value at 1e-6: 2.7 / sqrt(n)); neighbours
    uncorrelated, and the streams of neighbouring keys (consecutive steps' generators) too (within 5 standard errors)."""
    n = 200_000
    u = uniforms((n,), torch.Generator().manual_seed(0), "cpu").double()
    s, _ = u.sort()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((grid - s).abs().max(), (s - (grid - 1 / n)).abs().max()).item()
    assert ks < 2.7 / math.sqrt(n)
    assert abs(_corr(u[:-1], u[1:])) < 5 / math.sqrt(n)
    assert abs(_corr(u[0::2], u[1::2])) < 5 / math.sqrt(n / 2)
    for key in (0, 1, 2**32, 12345):
        a, b = hashed_uniforms(key, n).double(), hashed_uniforms(key + 1, n).double()
        assert abs(_corr(a, b)) < 5 / math.sqrt(n)
    # the 4 entries of a 2:4 group: each position is the largest equally often
    top = hashed_uniforms(7, 4 * n).view(n, 4).argmax(1).bincount(minlength=4).double() / n
    assert (top - 0.25).abs().max().item() < 5 * math.sqrt(0.25 * 0.75 / n)
