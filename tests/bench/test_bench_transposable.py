"""`nmsparse bench transposable`: a tiny run through the command line, and its argument checks."""

import json

import pytest

from nmsparse.bench import transposable as bt
from nmsparse.cli import main
from nmsparse.kernels.transposable import native_available, native_error


def test_tiny_run_writes_every_solver_and_the_targets(tmp_path, capsys):
    if not native_available():
        pytest.skip(f"the compiled transposable solver is unavailable: {native_error()}")
    out = tmp_path / "bt.md"
    assert main(["bench", "transposable", "--size", "64", "--nm", "4:8", "8:16", "--repeats", "1",
                 "--budget", "0.01", "--ortools-tiles", "4", "--out", str(out)]) == 0
    text = out.read_text()
    for piece in ["compiled, 1 thread", "compiled, 2 threads", "PyTorch exact, 1 thread", "| 4:8 |", "| 8:16 |",
                  "issue #12 targets", "load average", "machine:"]:
        assert piece in text
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["n"], r["m"]) for r in rows] == [(4, 8), (8, 16)]
    assert all(r["torch_diff"] < 1e-9 for r in rows)  # the same optimum as the PyTorch solver
    if "ortools" in rows[0]:
        assert "extrapolated from 4 tiles" in text and all(r["ortools_diff"] < 1e-6 for r in rows)


@pytest.mark.parametrize("bad", ["8:4", "4", "a:b", "0:8"])
def test_bad_nm_is_one_line(bad, capsys):
    assert main(["bench", "transposable", "--size", "64", "--nm", bad]) == 2
    assert "--nm takes N:M" in capsys.readouterr().err


def test_defaults_cover_the_issue_patterns():
    assert bt.NM == [(4, 8), (8, 16), (16, 32)]
    assert set(bt.TARGET_1_THREAD_S) <= set(bt.NM)
