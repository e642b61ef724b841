"""`nmsparse bench prune`: a small run through the command line, and its argument checks."""

import json

import pytest

from nmsparse.cli import main
from nmsparse.kernels.native_prune import native_prune_available


@pytest.mark.skipif(not native_prune_available(), reason="no C++ build")
def test_quick_run_writes_tables_and_checks_agreement(tmp_path, capsys):
    out = tmp_path / "prune.md"
    assert main(["bench", "prune", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SDGP gradient pruning (2:4)" in text and "SR-STE weight mask (2:4)" in text
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"magnitude", "random", "rescale", "random-unbiased", "mvue", "nm_mask"} <= methods
    assert all(r["torch_ms"] > 0 and r["native_ms"] > 0 and r["speedup_cpu"] > 0 for r in rows)


@pytest.mark.parametrize("bad", ["4:4", "2-4", "0:4"])
def test_bad_pattern_is_refused(bad, capsys):
    assert main(["bench", "prune", "--nm", bad]) == 2
    assert "N:M" in capsys.readouterr().err
