"""The cpu profile on another processor: a plain warning, --calibrate, and the per-CPU cache."""

import json

import pytest
import torch

from nmsparse.cli import main as cli
from nmsparse.compile import cpu_profile, load_target
from nmsparse.compile.calibrate import write_profile
from nmsparse.compile.cpu_profile import cached_profile_path, cache_dir, cpu_mismatch, profile_cpu, resolve_cpu_profile

XEON = "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"


@pytest.fixture
def xeon(monkeypatch, tmp_path):
    """This machine pretends to be a Xeon, with an empty cache of its own."""
    monkeypatch.setattr(cpu_profile, "cpu_name", lambda: XEON)
    monkeypatch.setenv("NMSPARSE_CACHE_DIR", str(tmp_path / "cache" / "nmsparse"))
    return tmp_path / "cache" / "nmsparse"


def fake_calibrate(calls):
    """A calibration in no time: the shipped numbers, recorded as measured on this 'Xeon'."""
    def calibrate(path, *, threads=1, quick=False, backend="auto", log=print):
        calls.append((str(path), threads))
        shipped = {k: v for k, v in load_target("cpu").to_dict().items() if k != "source"}
        params = dict(shipped, machine=f"{XEON}, 64 logical cores, torch {torch.__version__}",
                      threads=threads, measured="2026-01-01 00:00 (fake)")
        params["dense"] = dict(params["dense"], conv1x1_gmacs=12.5)
        if path is not None:
            write_profile(params, path)
        return params
    return calibrate


def test_shipped_profile_names_its_cpu():
    shipped = load_target("cpu")
    assert profile_cpu(shipped.params) == "AMD EPYC"
    assert profile_cpu({"machine": "my laptop"}) is None  # a hand-written line: no claim, no warning
    assert cpu_mismatch(shipped, cpu="AMD EPYC") is None and cpu_mismatch(shipped, cpu="amd  epyc") is None


def test_cache_path_per_cpu_model_and_threads(monkeypatch, tmp_path):
    monkeypatch.delenv("NMSPARSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cached_profile_path(2, cpu=XEON) == tmp_path / "xdg" / "nmsparse" / (
        "cpu-intel-r-xeon-r-gold-6338-cpu-2-00ghz-2t.yaml")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "nmsparse"
    monkeypatch.setenv("NMSPARSE_CACHE_DIR", str(tmp_path / "mine"))
    assert cached_profile_path(1, cpu="AMD EPYC") == tmp_path / "mine" / "cpu-amd-epyc-1t.yaml"


def test_other_cpu_gets_a_plain_warning_and_the_calibrate_offer(xeon):
    tgt, note = resolve_cpu_profile("cpu", threads=1)
    assert tgt.source == str(load_target("cpu").source)  # still the shipped numbers, but said plainly
    assert note.startswith("WARNING") and "AMD EPYC" in note and XEON in note
    assert "off by tens of percent" in note and "--calibrate" in note
    assert str(xeon / "cpu-intel-r-xeon-r-gold-6338-cpu-2-00ghz-1t.yaml") in note
    # a profile passed by path gets the same warning
    _, note = resolve_cpu_profile(load_target("cpu").source, threads=1)
    assert note.startswith("WARNING") and XEON in note


def test_first_use_calibrates_once_then_the_cache_is_used(xeon):
    calls = []
    logs = []
    tgt, note = resolve_cpu_profile("cpu", threads=1, auto_calibrate=True, calibrate_fn=fake_calibrate(calls),
                                    log=logs.append)
    path = xeon / "cpu-intel-r-xeon-r-gold-6338-cpu-2-00ghz-1t.yaml"
    assert calls == [(str(path), 1)] and path.is_file() and tgt.source == str(path)
    assert tgt["dense"]["conv1x1_gmacs"] == 12.5 and "first use" in note
    assert any("AMD EPYC" in m and XEON in m for m in logs)  # why it calibrates
    # afterwards: the cached profile, no measurement (even where auto-calibration is on), nothing to warn about
    tgt2, note2 = resolve_cpu_profile("cpu", threads=1, auto_calibrate=True, calibrate_fn=fake_calibrate(calls))
    assert calls == [(str(path), 1)] and tgt2.source == str(path) and "from the cache" in note2
    assert tgt2["dense"]["conv1x1_gmacs"] == 12.5
    # another thread count is another profile
    resolve_cpu_profile("cpu", threads=2, auto_calibrate=True, calibrate_fn=fake_calibrate(calls), log=logs.append)
    assert calls[-1] == (str(xeon / "cpu-intel-r-xeon-r-gold-6338-cpu-2-00ghz-2t.yaml"), 2)
    # --calibrate measures again, over the cached file
    resolve_cpu_profile("cpu", threads=1, calibrate=True, calibrate_fn=fake_calibrate(calls), log=logs.append)
    assert calls[-1] == (str(path), 1) and len(calls) == 3


def test_unreadable_cache_is_ignored_with_a_message(xeon):
    path = cached_profile_path(1)
    path.parent.mkdir(parents=True)
    path.write_text("kind: cpu\n")
    logs = []
    tgt, note = resolve_cpu_profile("cpu", threads=1, log=logs.append)
    assert tgt.source != str(path) and note.startswith("WARNING") and "ignoring the cached cpu profile" in logs[0]


def test_same_cpu_uses_the_shipped_profile_silently(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_profile, "cpu_name", lambda: "AMD EPYC")
    monkeypatch.setenv("NMSPARSE_CACHE_DIR", str(tmp_path))
    tgt, note = resolve_cpu_profile("cpu", threads=1, auto_calibrate=True,
                                    calibrate_fn=lambda *a, **k: pytest.fail("calibrated on the profile's own CPU"))
    assert note is None and tgt.source == str(load_target("cpu").source)


def compile_cpu(tmp_path, *extra):
    return cli(["compile", "small_cnn", "--prune", "0.5", "--target", "cpu", "--measure", "no", "--no-charts",
                "--out", str(tmp_path / "out"), *extra])


def test_compile_cpu_warns_then_calibrate_caches_and_later_runs_use_it(xeon, tmp_path, capsys, monkeypatch):
    assert compile_cpu(tmp_path) == 0
    err = capsys.readouterr().err
    assert "WARNING: the cpu profile" in err and "AMD EPYC" in err and XEON in err and "--calibrate" in err
    calls = []
    monkeypatch.setattr("nmsparse.compile.calibrate.calibrate_cpu", fake_calibrate(calls))
    assert compile_cpu(tmp_path, "--calibrate") == 0
    out = capsys.readouterr()
    path = xeon / "cpu-intel-r-xeon-r-gold-6338-cpu-2-00ghz-1t.yaml"
    assert calls == [(str(path), 1)] and "WARNING" not in out.err and "calibrated now" in out.out
    assert compile_cpu(tmp_path) == 0
    out = capsys.readouterr()
    assert len(calls) == 1 and "WARNING" not in out.err and f"from the cache {path}" in out.out
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["target"]["source"] == str(path)


def test_compile_calibrate_is_for_cpu_targets_only(tmp_path, capsys):
    assert cli(["compile", "small_cnn", "--target", "aie2", "--calibrate", "--out", str(tmp_path / "o")]) != 0
    assert "--calibrate measures a cpu profile; target 'aie2' is aie2" in capsys.readouterr().err
