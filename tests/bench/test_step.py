"""`nmsparse bench step`: the suite end to end on tiny models, its table and files, and --methods checks.

No timing assertions: how fast a method is belongs to the benchmark, not to the tests."""

import csv
import statistics

import pytest
import torch

import nmsparse.bench.step as step_mod
from nmsparse.bench.step import METHODS, StepOptions, make_optimizer, run_step_bench, select_methods
from nmsparse.bench.step_report import _target as table_target
from nmsparse.bench.step_report import format_result, table
from nmsparse.bench.step_rss import measure_rss
from nmsparse.bench.timing import paired_ratios
from nmsparse.cli import main
from nmsparse.common.system import flushes_denormals

TINY = dict(resnet_width=8, resnet_batch=2, image_size=8, gpt_layers=1, gpt_width=16, gpt_heads=2, gpt_block=8,
            gpt_batch=2, gpt_vocab=17)
FAST = dict(steps=2, warmup=1, block=1, recompute_every=2, profile_steps=1, sparsify_repeats=1, rss_steps=0)
TINY_ARGS = ["--resnet-width", "8", "--resnet-batch", "2", "--image-size", "8", "--gpt-layers", "1", "--gpt-width",
             "16", "--gpt-heads", "2", "--gpt-block", "8", "--gpt-batch", "2", "--steps", "2", "--warmup", "1",
             "--block", "1", "--recompute-every", "2", "--profile-steps", "1", "--sparsify-repeats", "1",
             "--rss-steps", "0"]
SHARES = ("share_mask", "share_masking", "share_grad_prune", "share_rest")


def quiet(*args):
    pass


def check_rows(rows, models, modes, methods):
    assert [(r["model"], r["mode"], r["method"]) for r in rows] == [
        (m, mode, name) for m in models for mode in modes for name in methods]
    for r in rows:
        assert r["steps"] == 2 and 0 < r["median_ms"] <= r["worst_ms"] and r["mean_ms"] > 0
        assert r["ratio_lo"] <= r["ratio_median"] <= r["ratio_hi"] and len(r["times_ms"]) == 2
        if r["method"] == "dense":
            assert r["ratio_median"] == 1.0 and r["ratio_mean"] == 1.0 and r["sparsify_s"] is None
            assert r["target"] is None and r["peak_vs_dense"] == 1.0
        else:
            assert r["target"] in (1.10, 1.15) and isinstance(r["meets"], bool) and r["sparsify_s"] > 0
        assert r["peak_mb"] > 0 and r["rss_mb"] is None  # rss_steps=0: no RSS processes
        if r["mode"] == "compile":
            assert all(type(r[k]) is int and r[k] >= 0 for k in ("recompiles", "compiles_warmup", "graph_breaks"))
            assert all(r[k] is None for k in SHARES)  # Dynamo drops profiler scopes: shares are eager only
        else:
            assert r["recompiles"] is None
            assert all(r[k] >= 0 for k in SHARES) and sum(r[k] for k in SHARES) <= 1 + 1e-9


@pytest.mark.slow
def test_every_method_on_both_tiny_models_eager():
    res = run_step_bench(StepOptions(compile="off", **TINY, **FAST), log=quiet)
    check_rows(res["rows"], ["resnet18", "gpt"], ["eager"], list(METHODS))
    by = {(r["model"], r["method"]): r for r in res["rows"]}
    for model in ("resnet18", "gpt"):
        # each method's own scope takes time: masks for the weight methods that recompute, SDGP's pruning
        assert by[model, "srste-2:4"]["share_mask"] > 0 and by[model, "srste-2:4"]["share_masking"] > 0
        assert by[model, "transposable-4:8-exact"]["share_mask"] > 0
        assert by[model, "sdgp-rescale-2:4"]["share_grad_prune"] > 0 and by[model, "sdgp-rescale-2:4"]["share_mask"] == 0
        assert by[model, "dense"]["share_rest"] == 1.0
    text = format_result(res)
    assert "load average (1/5/15 min):" in text and "machine:" in text and "(1 thread)" in text
    for name in METHODS:
        assert f"| {name} |" in text
    assert text.count("| 1.00 | 1.00 |") >= 2  # dense's ratios, one row per model
    # 2 timed steps are not two recompute periods of 2: the header says the amortised ratios are not representative
    assert "NOTE 2 timed steps" in text


@pytest.mark.slow
def test_compiled_steps_count_recompiles_as_integers():
    opts = StepOptions(models=("gpt",), methods=["fixed-2:4"], compile="both", compile_backend="eager", **TINY, **FAST)
    res = run_step_bench(opts, log=quiet)
    check_rows(res["rows"], ["gpt"], ["eager", "compile"], ["dense", "fixed-2:4"])
    compiled = [r for r in res["rows"] if r["mode"] == "compile"]
    assert all(r["compiles_warmup"] >= 1 for r in compiled)  # the warm-up compiled each model
    assert "| gpt | compile | fixed-2:4 |" in table(res["rows"]) and "torch.compile backend eager" in res["header"][2]


@pytest.mark.slow
def test_compiled_sdgp_random_runs_in_one_graph_beside_the_others():
    """SDGP random once broke the graph at every layer (a generator per step) and was timed in a group of its own;
    with its traced key it compiles to one graph, interleaved with dense and the weight methods, no recompiles."""
    opts = StepOptions(models=("gpt",), methods=["fixed-2:4", "sdgp-random-2:4", "sdgp-mvue-2:4"], compile="on",
                       compile_backend="eager", **TINY, **FAST)
    rows = run_step_bench(opts, log=quiet)["rows"]
    assert [r["method"] for r in rows] == ["dense", "fixed-2:4", "sdgp-random-2:4", "sdgp-mvue-2:4"]
    assert all(r["recompiles"] == 0 and r["graph_breaks"] == 0 for r in rows), rows


@pytest.mark.slow
def test_peak_rss_comes_from_each_methods_own_process():
    """Eager rows get the peak RSS of a fresh process per method and its difference to dense's; compiled rows none."""
    opts = StepOptions(models=("gpt",), methods=["fixed-2:4", "transposable-4:8-exact"], compile="both",
                       compile_backend="eager", **TINY, **{**FAST, "rss_steps": 2})
    rows = run_step_bench(opts, log=quiet)["rows"]
    eager = [r for r in rows if r["mode"] == "eager"]
    assert [r["method"] for r in eager] == ["dense", "fixed-2:4", "transposable-4:8-exact"]
    assert eager[0]["rss_mb"] > 50 and eager[0]["rss_vs_dense_mb"] == 0  # torch alone takes more than 50 MB
    for r in eager[1:]:
        assert r["rss_mb"] > 50 and r["rss_vs_dense_mb"] == pytest.approx(r["rss_mb"] - eager[0]["rss_mb"])
    assert all(r["rss_mb"] is None for r in rows if r["mode"] == "compile")
    assert "| RSS MB | RSS +MB |" in table(rows)


def test_a_stuck_rss_process_times_out_with_model_and_method_named():
    with pytest.raises(RuntimeError, match=r"peak-RSS process of gpt dense did not finish in 0.01 s"):
        measure_rss("gpt", ["dense"], StepOptions(**TINY), 1, log=quiet, timeout_s=0.01)


def test_several_runs_plot_as_dots_and_a_mean_bar(tmp_path):
    """scripts/plot_step_runs.py reads the step.csv of each run (as `bench step --out` writes it)."""
    import runpy
    from pathlib import Path

    from nmsparse.bench.step_report import CSV_KEYS

    runs = []
    for k, ratio in enumerate((1.05, 1.12)):
        path = tmp_path / f"run{k}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_KEYS, extrasaction="ignore")
            w.writeheader()
            w.writerow({"method": "dense", "ratio_median": 1.0, "ratio_mean": 1.0, "target": "", "target_on": ""})
            w.writerow({"method": "fixed-2:4", "ratio_median": ratio, "ratio_mean": 2.0, "target": 1.1,
                        "target_on": "median"})
        runs.append(f"R{k}={path}")
    script = runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "plot_step_runs.py"))
    assert script["ratio"]({"ratio_median": "1.05", "ratio_mean": "2", "target_on": "median"}) == 1.05
    assert script["ratio"]({"ratio_median": "1.05", "ratio_mean": "2", "target_on": "mean"}) == 2.0
    script["main"](str(tmp_path / "runs.png"), "two runs", runs)
    assert (tmp_path / "runs.png").stat().st_size > 0


def test_fused_adamw_is_the_default_and_the_header_names_the_optimizer():
    opts = StepOptions(models=("gpt",), methods=["fixed-2:4"], compile="off", optimizer="adamw-fused", **TINY, **FAST)
    res = run_step_bench(opts, log=quiet)
    assert "AdamW (fused)" in res["header"][2] and [r["method"] for r in res["rows"]] == ["dense", "fixed-2:4"]
    assert make_optimizer(torch.nn.Linear(4, 4), opts).defaults["fused"] is True
    assert make_optimizer(torch.nn.Linear(4, 4), StepOptions()).defaults["fused"]  # nmsparse train's AdamW
    assert not make_optimizer(torch.nn.Linear(4, 4), StepOptions(optimizer="adamw")).defaults["fused"]
    with pytest.raises(ValueError, match="optimizer must be one of adamw, adamw-fused, got 'adam'"):
        StepOptions(optimizer="adam")


@pytest.mark.slow
def test_the_peak_rss_is_the_childs_own_not_the_parents():
    """Linux keeps ru_maxrss across exec: a child forked from a large bench process reported the parent's peak."""
    from nmsparse.bench.step_rss import _peak_mb

    ballast = torch.ones(2**27)  # 512 MB, touched
    parent = _peak_mb()
    child = measure_rss("gpt", ["dense"], StepOptions(**TINY), 1, log=quiet)["dense"]
    del ballast
    assert 0 < child["base_mb"] <= child["peak_mb"] < parent - 400


@pytest.mark.slow
def test_a_failing_rss_process_names_model_method_and_cause():
    with pytest.raises(RuntimeError, match=r"(?s)peak-RSS process of nope dense failed.*unknown model 'nope'"):
        measure_rss("nope", ["dense"], StepOptions(), 1, log=quiet)


def test_methods_are_selected_by_name_or_pattern_with_dense_first():
    assert select_methods(None) == list(METHODS)
    assert select_methods(["sdgp-*"]) == ["dense"] + [m for m in METHODS if m.startswith("sdgp-")]
    assert select_methods(["fixed-2:4", "dense"]) == ["dense", "fixed-2:4"]
    with pytest.raises(ValueError, match=r"unknown method 'srste-24'; did you mean 'srste-2:4'\?"):
        select_methods(["srste-24"])


def test_bad_method_is_named_before_any_work(capsys):
    assert main(["bench", "step", "--methods", "sdgp-rescale-2:4", "transposable-4:8-exakt"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'transposable-4:8-exakt'; did you mean 'transposable-4:8-exact'? Choose from dense," in err
    assert main(["bench", "step", "--methods", "xyz"]) == 2
    assert "unknown method 'xyz'. Choose from dense, srste-2:4," in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--compile", "sometimes"], ["--steps", "0"], ["--models", "vgg16"],
                                 ["--flush-denormal", "maybe"]])
def test_bad_options_are_refused_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "step", *bad])
    assert "error: argument" in capsys.readouterr().err


def test_command_prints_the_table_and_writes_md_csv_png(tmp_path, capsys):
    out = tmp_path / "step"
    assert main(["bench", "step", "--models", "gpt", "--methods", "ste-2:4", "--compile", "off", *TINY_ARGS,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| gpt | eager | ste-2:4 |" in printed and "load average" in printed
    assert (out / "step.png").stat().st_size > 0
    assert "| gpt | eager | dense |" in (out / "step.md").read_text()
    rows = list(csv.DictReader(open(out / "step.csv")))
    assert [r["method"] for r in rows] == ["dense", "ste-2:4"] and float(rows[0]["ratio_median"]) == 1.0
    assert float(rows[1]["ratio_lo"]) <= float(rows[1]["ratio_median"]) <= float(rows[1]["ratio_hi"])
    steps = list(csv.DictReader(open(out / "step_times.csv")))  # every timed step: 2 per method
    assert [(r["method"], r["step"]) for r in steps] == [("dense", "0"), ("dense", "1"), ("ste-2:4", "0"),
                                                          ("ste-2:4", "1")]
    assert all(float(r["ms"]) > 0 for r in steps) and "[" in (out / "step.md").read_text()  # the interval printed


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, capsys, no_matplotlib):
    out = tmp_path / "step"
    assert main(["bench", "step", "--models", "gpt", "--methods", "dense", "--compile", "off", *TINY_ARGS,
                 "--profile-steps", "0", "--out", str(out)]) == 0
    assert "Plots skipped" in capsys.readouterr().out
    assert (out / "step.csv").exists() and not (out / "step.png").exists()
    assert "| gpt | eager | dense |" in (out / "step.md").read_text()


def test_out_must_not_be_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    assert main(["bench", "step", "--methods", "dense", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_every_round_runs_every_method_once_in_a_fresh_order(monkeypatch):
    seen = []
    real = step_mod._train_step

    def spy(fn, opt, x, y):
        seen.append(id(fn))
        return real(fn, opt, x, y)

    monkeypatch.setattr(step_mod, "_train_step", spy)
    methods = ["ste-2:4", "fixed-2:4", "sdgp-magnitude-2:4"]
    o = StepOptions(models=("gpt",), methods=methods, compile="off", **TINY,
                    **{**FAST, "steps": 6, "warmup": 0, "profile_steps": 0})
    res = run_step_bench(o, log=quiet)
    assert [r["steps"] for r in res["rows"]] == [6] * 4
    rounds = [seen[i:i + 4] for i in range(0, 24, 4)]
    assert all(len(set(r)) == 4 for r in rounds) and len({tuple(r) for r in rounds}) > 1
    assert all(r["ratio_median"] > 0 for r in res["rows"]) and res["rows"][0]["ratio_median"] == 1.0


def test_a_short_last_round_pairs_with_dense_s_short_last_round(monkeypatch):
    o = StepOptions(models=("gpt",), methods=["fixed-2:4"], compile="off", **TINY,
                    **{**FAST, "steps": 5, "block": 2, "warmup": 0, "profile_steps": 0})
    res = run_step_bench(o, log=quiet)
    dense, fixed = res["rows"]
    assert dense["steps"] == fixed["steps"] == 5
    ratios = paired_ratios(fixed["times_ms"], dense["times_ms"], 2)  # rounds of 2, 2 and 1 steps
    assert len(ratios) == 3 and ratios[2] == fixed["times_ms"][4] / dense["times_ms"][4]
    assert fixed["ratio_median"] == pytest.approx(statistics.median(ratios))
    assert any("3 rounds: too few for a 95% interval" in h for h in res["header"])
    assert (fixed["ratio_lo"], fixed["ratio_hi"]) == (min(ratios), max(ratios))


def test_a_target_inside_the_interval_is_marked_undecided():
    row = {"target": 1.15, "target_on": "median", "meets": True, "decided": False}
    assert "yes (interval spans it)" in table_target(row)
    assert table_target({**row, "decided": True}).endswith(": yes")


@pytest.mark.parametrize("flush", [True, False])
def test_steps_run_with_subnormals_flushed_by_default_and_the_header_says_which(monkeypatch, flush):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals (torch.set_flush_denormal)")
    seen, real = [], step_mod._train_step

    def spy(*a):
        seen.append(flushes_denormals())
        return real(*a)

    monkeypatch.setattr(step_mod, "_train_step", spy)
    opts = StepOptions(models=("gpt",), methods=["fixed-2:4"], compile="off", flush_denormal=flush, **TINY,
                       **dict(FAST, profile_steps=0))
    res = run_step_bench(opts, log=quiet)
    assert seen and set(seen) == {flush} and not flushes_denormals()  # in effect for every step, the default after
    assert ("subnormal floats flushed to zero" if flush else "subnormal floats kept") in res["header"][2]
    assert StepOptions().flush_denormal


def test_flush_denormal_option_parses_on_and_off(monkeypatch, capsys):
    got = []
    monkeypatch.setattr(step_mod, "run_step_bench", lambda o, log=print: got.append(o) or {"header": [], "models": [],
                                                                                         "rows": [], "steps": 1})
    import nmsparse.bench.step_report as report
    monkeypatch.setattr(report, "run_step_bench", step_mod.run_step_bench)
    monkeypatch.setattr(report, "format_result", lambda r: "")
    for value in ("off", "on"):
        main(["bench", "step", "--flush-denormal", value, "--compile", "off"])
    assert [o.flush_denormal for o in got] == [False, True]
