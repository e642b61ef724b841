"""`nmsparse bench deploy`: argument checks, what it prints, and a tiny end-to-end run."""

import argparse

import pytest
import torch

from nmsparse.bench import deploy
from nmsparse.bench.deploy import add_deploy_arguments, deploy_main, run_deploy_bench


def parser():
    p = argparse.ArgumentParser(prog="nmsparse bench deploy")
    add_deploy_arguments(p)
    return p


@pytest.mark.parametrize("bad", ["1.5", "1", "-0.1", "nan", "half"])
def test_sparsity_out_of_range_names_the_option_and_range(bad, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--sparsity", bad])
    err = capsys.readouterr().err
    assert "argument --sparsity" in err and "0 <= s < 1" in err and "prune sparsity" not in err


def test_arguments_defaults_and_compat_alias():
    a = parser().parse_args([])
    assert a.sparsity == [0.5, 0.75] and a.summary is False
    a = parser().parse_args(["--sparsity", "0", "0.9", "--layers", "--summary"])
    assert a.sparsity == [0.0, 0.9] and a.layers and a.summary
    with pytest.raises(ValueError, match=r"sparsities .* 0 <= s < 1, got \[1\.5\]"):
        run_deploy_bench(sparsities=(1.5,))


@pytest.mark.slow
def test_tiny_run_prints_layers_by_default_and_summary_on_request(monkeypatch, capsys):
    torch.manual_seed(0)
    res = run_deploy_bench(quick=True, networks=("vgg16",), sparsities=(0.5,), image_size=32, repeats=1,
                           log=lambda *a: None)
    # the header states the thread count once, in words that agree with it
    assert res["machine"].count("thread") == 1 and "(1 thread)" in res["machine"]
    assert {r["weights_from"] for r in res["end_to_end"]} == {"compact file"}
    assert all(r["close"] for r in res["end_to_end"])
    rows = [r for r in res["layers"] if r["decision"] == "sparse"]
    assert rows and all(r["est_s"] > 0 and r["sparse_s"] > 0 for r in rows)
    monkeypatch.setattr(deploy, "run_deploy_bench", lambda **kw: res)
    deploy_main(parser().parse_args([]))
    full = capsys.readouterr().out
    assert "## vgg16 50%" in full and "| `features.2` |" in full and "estimate ms | error" in full
    deploy_main(parser().parse_args(["--summary"]))
    short = capsys.readouterr().out
    assert "## totals" in short and "## end_to_end" in short and "## vgg16 50%" not in short


@pytest.mark.slow
def test_profile_thread_count_mismatch_is_said():
    from nmsparse.compile import load_target

    prof = dict(load_target("cpu").params, name="cpu2", kind="cpu", threads=2)
    torch.manual_seed(0)
    res = run_deploy_bench(quick=True, networks=("vgg16",), sparsities=(0.5,), image_size=32, repeats=1,
                           profile=prof, log=lambda *a: None)
    assert "NOTE the profile was measured with 2 thread(s), this run uses 1" in res["machine"]


def test_calibration_options(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--calibrate", "--no-calibrate"])
    assert "not allowed with argument" in capsys.readouterr().err
    seen = []

    def fake(**kw):
        seen.append((kw["calibrate"], kw["auto_calibrate"]))
        return {"machine": "m", "tables": {}}

    monkeypatch.setattr(deploy, "run_deploy_bench", fake)
    for argv in ([], ["--calibrate"], ["--no-calibrate"]):
        deploy_main(parser().parse_args(argv))
    # the command calibrates on first use by default; --no-calibrate keeps a profile from another CPU (warned)
    assert seen == [(False, True), (True, True), (False, False)]


def test_profile_from_another_cpu_is_said_or_calibrated_once(monkeypatch, tmp_path):
    from nmsparse.compile import cpu_profile, load_target
    from nmsparse.compile.calibrate import write_profile

    xeon = "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    monkeypatch.setattr(cpu_profile, "cpu_name", lambda: xeon)
    monkeypatch.setenv("NMSPARSE_CACHE_DIR", str(tmp_path / "nmsparse"))
    tiny = dict(quick=True, networks=(), sparsities=(0.5,))  # the profile choice and the header only
    logs = []
    res = run_deploy_bench(**tiny, log=logs.append)
    assert "WARNING: the cpu profile" in res["machine"] and "measured on a different processor (AMD EPYC)" in \
        res["machine"] and xeon in res["machine"] and "--calibrate" in res["machine"]
    assert any(m.startswith("WARNING") for m in logs)  # printed as it starts, not only in the table header

    calls = []

    def calibrate(path, *, threads=1, quick=False, backend="auto", log=print):
        calls.append(path)
        params = {k: v for k, v in load_target("cpu").to_dict().items() if k != "source"}
        params.update(machine=f"{xeon}, 8 logical cores, torch x", measured="fake")
        write_profile(params, path)
        return params

    monkeypatch.setattr("nmsparse.compile.calibrate.calibrate_cpu", calibrate)
    res = run_deploy_bench(**tiny, auto_calibrate=True, log=lambda *a: None)
    cached = tmp_path / "nmsparse" / "cpu-intel-r-xeon-r-platinum-8375c-cpu-2-90ghz-1t.yaml"
    assert calls == [cached] and res["profile"]["source"] == str(cached) and "WARNING" not in res["machine"]
    assert "first use" in res["machine"]
    res = run_deploy_bench(**tiny, auto_calibrate=True, log=lambda *a: None)
    assert len(calls) == 1 and res["profile"]["source"] == str(cached) and "from the cache" in res["machine"]
