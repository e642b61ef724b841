"""`nmsparse prune --method wanda|sparsegpt` on a trained checkpoint: results, times, saved model, refusals."""

from __future__ import annotations

import argparse

import pytest

from nmsparse.patterns import conv_to_2d, is_nm, is_transposable
from nmsparse.prune.command import add_prune_arguments, format_result, prune_checkpoint, prune_command
from nmsparse.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    from nmsparse.train.config import load_config
    from nmsparse.train.loop import train

    out = tmp_path_factory.mktemp("digits")
    train(load_config("configs/digits-dense.yaml", ["epochs=3", "progress=false"]), out, log=lambda *a: None)
    return out / "checkpoint.pt"


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "4:8-T")])
def test_layerwise_methods_end_to_end(digits_ckpt, tmp_path, capsys, method, pattern):
    out = tmp_path / "p.pt"
    res = prune_checkpoint(digits_ckpt, pattern, calib=64, out=out, device="cpu", method=method, log=print)
    assert res["method"] == method and res["calib"] == 64
    for key in ("dense_acc", "magnitude_acc", "magnitude_bn_acc", f"{method}_acc", f"{method}_bn_acc",
                "magnitude_seconds", f"{method}_seconds"):
        assert key in res, key
    assert res["dense_acc"] > 80 and res[f"{method}_acc"] > 10
    assert [r["name"] for r in res["layers"]] == ["features.3", "features.6"]
    printed = capsys.readouterr().out
    name = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}[method]
    assert f"  {name} " in printed and f"{name} + BN" in printed and "magnitude only" in printed
    assert f"saved the {name} model" in printed and " s)" in printed
    ckpt = load_checkpoint(out)
    assert ckpt["pruned"]["method"] == method and ckpt["pruned"]["metric"]["key"] == "acc"
    for layer in ("features.3.weight", "features.6.weight"):
        w = ckpt["model"][layer]
        assert is_nm(w, 2, 4, dim=1) if pattern == "2:4" else is_transposable(conv_to_2d(w), 4, 8)
    if method == "sparsegpt":
        assert all(0 <= r["rel_error"] < 1 for r in res["layers"])


def test_command_line(digits_ckpt, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    out = tmp_path / "p.pt"
    args = parser.parse_args([str(digits_ckpt), "--pattern", "2:4", "--method", "sparsegpt", "--blocksize", "8",
                              "--percdamp", "0.05", "--calib", "20", "--out", str(out), "--device", "cpu"])
    assert prune_command(args) == 0
    assert "SparseGPT" in capsys.readouterr().out and out.exists()
    assert parser.parse_args([str(digits_ckpt), "--pattern", "2:4", "--out", "x"]).method is None  # AdaPrune
    cases = [
        (["--method", "wanda", "--pattern", "block8x8"], "wanda supports N:M and transposable N:M-T patterns"),
        (["--method", "sparsegpt", "--pattern", "4:8", "--blocksize", "12"], "blocksize"),
        (["--method", "sparsegpt", "--pattern", "2:4", "--percdamp", "-1"], "percdamp"),
        (["--method", "wanda", "--pattern", "2:4", "--magnitude-only"], "--magnitude-only means --method magnitude"),
    ]
    for argv, msg in cases:
        never = tmp_path / "never.pt"
        assert prune_command(parser.parse_args([str(digits_ckpt), *argv, "--out", str(never)])) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
        assert not never.exists()
    with pytest.raises(SystemExit):
        parser.parse_args([str(digits_ckpt), "--pattern", "2:4", "--method", "obs", "--out", "x"])
    capsys.readouterr()


def test_format_result_other_metric():
    """The report reads the metric's key and unit, so a loss can replace the accuracy."""
    res = {"pattern": "2:4", "calib": 8, "iters": 0, "method": "wanda",
           "metric": {"key": "loss", "name": "validation loss", "unit": " nats"},
           "dense_loss": 1.5, "magnitude_loss": 2.25, "magnitude_bn_loss": 2.0, "wanda_loss": 1.75,
           "magnitude_seconds": 0.01, "wanda_seconds": 0.5, "layers": [{"name": "l", "rows": 8, "seconds": 0.5}]}
    text = format_result(res)
    assert "dense            1.5000 nats" in text and "Wanda            1.7500 nats   (0.50 s)" in text
    assert "l: 8 calibration rows" in text and "%" not in text
