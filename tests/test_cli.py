"""The command line: the demo (README's main job until training lands) and the patterns benchmark."""

import pytest

from nmsparse.cli import main


def test_demo_prints_every_pattern(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for name in ["2:4", "4:8", "2:4-T exact", "4:8-T exact", "4:8-T greedy", "block 8x8 50%"]:
        assert f"| {name} |" in out
    assert "0.448" in out and "0.398" in out  # mask diversity column, SPEC section 4
    tile_rows = [line for line in out.splitlines() if set(line) <= {"#", "."} and len(line) == 16]
    assert len(tile_rows) == 8 and all(r[:8].count("#") == 4 for r in tile_rows)


def test_bench_patterns_small(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert main(["bench", "patterns", "--sizes", "64", "--budget", "0.05", "--baseline-tiles", "8",
                 "--out", str(out)]) == 0
    text = out.read_text()
    for piece in ["nm_mask 2:4", "transposable exact 4:8", "transposable greedy 8:16", "block_mask 8x8",
                  "greedy kept sum / exact", "machine:"]:
        assert piece in text
    pytest.importorskip("ortools")
    assert "OR-tools per tile" in text
    assert (tmp_path / "bench.json").exists()


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_version(capsys):
    from nmsparse.common import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"nmsparse {__version__}"


def test_bench_gpu_names_an_unknown_section():
    with pytest.raises(SystemExit) as info:
        main(["bench", "gpu", "--sections", "roofs,gemms"])
    assert "--sections: unknown gemms" in str(info.value.code) and "roofs,prune,gemm,block,train" in str(info.value.code)


def test_bench_gpu_sections_take_spaces(monkeypatch):
    from nmsparse.bench import gpu

    seen = {}
    monkeypatch.setattr(gpu, "run", lambda out, quick, sections: seen.update(sections=sections) or {"errors": []})
    assert main(["bench", "gpu", "--sections", "roofs, prune"]) == 0
    assert seen["sections"] == ["roofs", "prune"]
    monkeypatch.setattr(gpu, "run", lambda out, quick, sections: {"errors": [{"section": "prune"}]})
    assert main(["bench", "gpu"]) == 1  # a failed section fails the command
