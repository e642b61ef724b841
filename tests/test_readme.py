"""README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    if re.search(r"^import transformers", BLOCKS[index], flags=re.M):
        pytest.importorskip("transformers")  # the optional extra nmsparse[hf]
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})
