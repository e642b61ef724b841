"""docs/api.md is the API reference generated from the docstrings: it must match the source."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "scripts" / "gen_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_reference_is_up_to_date():
    gen = load_generator()
    text = gen.generate()
    current = (ROOT / "docs" / "api.md").read_text() if (ROOT / "docs" / "api.md").exists() else ""
    assert current == text, f"docs/api.md is out of date: run `{gen.COMMAND}` and commit the result"


def test_api_reference_covers_the_public_names_deterministically():
    gen = load_generator()
    text = gen.generate()
    assert text == gen.generate() and " at 0x" not in text
    import nmsparse
    import nmsparse.compile
    import nmsparse.prune

    for name in nmsparse.__all__:
        assert f"`nmsparse.{name}" in text, name
    for mod in (nmsparse.compile, nmsparse.prune):
        for name in mod.__all__:
            assert f"`{mod.__name__}.{name}" in text, name
    assert "`nmsparse.train.loop.train(" in text and "*(no docstring)*" not in text
