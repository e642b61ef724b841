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
