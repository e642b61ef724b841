import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Measured cpu profiles are cached in nmsparse's cache directory: tests never read or fill the user's.

    (NMSPARSE_CACHE_DIR, not XDG_CACHE_HOME: torch keeps its compiled extensions under the latter.)
    """
    old = os.environ.get("NMSPARSE_CACHE_DIR")
    os.environ["NMSPARSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("nmsparse-cache"))
    yield
    if old is None:
        os.environ.pop("NMSPARSE_CACHE_DIR", None)
    else:
        os.environ["NMSPARSE_CACHE_DIR"] = old


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as on a base install without the [plot] extra."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401


M32 = 0xFFFFFFFF


def plain_hash32(x: int) -> int:
    """kernels.draws' 32-bit mix in its textbook form, on Python integers (an independent reference)."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0xD35A2D97) & M32
    return x ^ (x >> 15)


def plain_uniform(key: int, e: int) -> float:
    """Uniform number e of `key` on the CPU: the top 24 bits of two rounds of the mix, over 2**24."""
    x = plain_hash32((e & M32) ^ (key & M32))
    x = plain_hash32(x ^ (e >> 32) ^ (key >> 32))
    return (x >> 8) / 2**24


def plain_step_key(seed: int, step: int) -> int:
    """kernels.draws.step_key on Python integers: v = seed * 1_000_003 + step mod 2**64 in words (lo, hi);
    lo2 = hash32(hash32(lo) ^ hi); key = (hash32(lo2 ^ 0x9E3779B9 ^ hi) & 0x7FFFFFFF) << 32 | lo2."""
    v = (seed * 1_000_003 + step) % 2**64
    lo, hi = v & M32, v >> 32
    lo2 = plain_hash32(plain_hash32(lo) ^ hi)
    return ((plain_hash32(lo2 ^ 0x9E3779B9 ^ hi) & 0x7FFFFFFF) << 32) | lo2


def plain_uniforms(count: int, seed: int) -> list[float]:
    """The `count` uniforms a CPU call draws from a generator seeded with `seed`: one word of it is the key."""
    key = int(torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(seed)))
    return [plain_uniform(key, e) for e in range(count)]
