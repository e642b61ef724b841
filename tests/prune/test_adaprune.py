"""AdaPrune: pattern exactness, mean absorption, reconstruction, batch-norm recalibration, end to end."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.prune import (absorb_mean_, adaprune, magnitude_prune, parse_pattern,
                            prunable_layers, recalibrate_bn, weight_mask)
from nmsparse.prune.command import (add_prune_arguments, calibration_set, format_result, prune_checkpoint,
                                    prune_command)
from nmsparse.train.checkpoint import load_checkpoint
from nmsparse.patterns import conv_to_2d, is_nm, is_transposable


class Tiny(nn.Module):
    """stem conv (kept dense) -> conv 8->16 -> BN -> ReLU -> pool -> Linear 16->16 -> ReLU -> Linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.conv(x)))
        x = x.mean((2, 3))
        return self.head(F.relu(self.fc1(x)))


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = Tiny().eval()
    with torch.no_grad():  # non-trivial running stats, so recalibration visibly changes them
        for bn in (m.bn0, m.bn1):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return m


def _x(n=12, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _blocks_ok(w: torch.Tensor, sparsity: float) -> bool:
    """Every 8x8 (out, in) block is all zero or fully kept-shaped, and the right number are zero."""
    co, ci = w.shape[:2]
    nz = (w != 0).reshape(co // 8, 8, ci // 8, 8, -1).any(-1).any(3).any(1)
    return int((~nz).sum()) == round(sparsity * nz.numel())


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "4:8-T", "block8x8"])
def test_pattern_exact_after_adaprune(pattern):
    model = _tiny()
    x = _x()
    adaprune(model, x, pattern, iters=20, bn_recalib_x=x)
    names = [n for n, _ in prunable_layers(model)]
    assert names == ["conv", "fc1"]
    assert model.stem.weight.ne(0).all() and model.head.weight.ne(0).all()  # left dense
    for name in names:
        w = dict(model.named_modules())[name].weight.detach()
        if pattern in ("2:4", "4:8"):
            n, m = map(int, pattern.split(":"))
            assert is_nm(w, n, m, dim=1), name
        elif pattern == "4:8-T":
            w2 = conv_to_2d(w) if w.dim() == 4 else w
            assert is_transposable(w2, 4, 8), name
        else:
            assert _blocks_ok(w, 0.5), name


def test_magnitude_prune_matches_masks():
    model = _tiny()
    dense = copy.deepcopy(model)
    magnitude_prune(model, "2:4")
    for name in ("conv", "fc1"):
        wd = dict(dense.named_modules())[name].weight
        w = dict(model.named_modules())[name].weight
        assert torch.equal(w, wd * weight_mask(wd, "2:4"))
    assert torch.equal(model.stem.weight, dense.stem.weight)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("4:8-T", 4, 8)])
def test_mean_absorption_preserves_group_sums(pattern, n, m):
    torch.manual_seed(0)
    w = torch.randn(16, 16, 3, 3)
    mask = weight_mask(w, pattern)
    out = absorb_mean_(w.clone(), mask, pattern)
    assert torch.equal(out != 0, mask)
    if pattern == "4:8-T":  # groups: m consecutive entries along the input axis of the (Co, kh*kw*Ci) view
        g_in, g_out, g_mask = (conv_to_2d(t).reshape(-1, m) for t in (w, out, mask))
    else:  # groups: m consecutive input channels at one (out, kh, kw)
        g_in, g_out, g_mask = (t.movedim(1, -1).reshape(-1, m) for t in (w, out, mask))
    torch.testing.assert_close(g_out.sum(-1), g_in.sum(-1), rtol=1e-5, atol=1e-5)
    # at 50% each kept weight gains exactly the mean of its group's pruned weights
    pruned_mean = (g_in * ~g_mask).sum(-1, keepdim=True) / (m - n)
    torch.testing.assert_close(g_out[g_mask], (g_in + pruned_mean).expand_as(g_in)[g_mask])


def test_mean_absorption_block_only_masks():
    w = torch.randn(16, 16)
    mask = weight_mask(w, "block8x8")
    assert torch.equal(absorb_mean_(w.clone(), mask, "block8x8"), w * mask)


def test_reconstruction_beats_magnitude():
    model = _tiny()
    x = _x(40)
    report = []
    adaprune(model, x, "2:4", iters=200, absorb_mean=False, report=report)
    assert [r["name"] for r in report] == ["conv", "fc1"]
    for r in report:
        assert r["mse_final"] < 0.5 * r["mse_magnitude"], r
    # independent check on the first layer: its input does not depend on the pruning
    dense = _tiny()
    y = dense.conv(F.relu(dense.bn0(dense.stem(x))))
    h = F.relu(model.bn0(model.stem(x)))
    mse_mag = F.mse_loss(F.conv2d(h, dense.conv.weight * weight_mask(dense.conv.weight, "2:4"),
                                  dense.conv.bias, padding=1), y)
    mse_ada = F.mse_loss(model.conv(h), y)
    assert mse_ada < mse_mag
    assert is_nm(model.conv.weight, 2, 4, dim=1)


def test_bn_recalibration_matches_batch_statistics():
    model = _tiny()
    x = _x(16)
    adaprune(model, x, "4:8", iters=5, bn_recalib_x=x)
    assert not model.training
    with torch.no_grad():
        a0 = model.stem(x)
        m0, v0 = a0.mean((0, 2, 3)), a0.var((0, 2, 3), unbiased=True)
        h = F.relu((a0 - m0[:, None, None]) / torch.sqrt(a0.var((0, 2, 3), unbiased=False)[:, None, None]
                                                          + model.bn0.eps) * model.bn0.weight[:, None, None]
                   + model.bn0.bias[:, None, None])
        a1 = model.conv(h)
        m1, v1 = a1.mean((0, 2, 3)), a1.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(model.bn0.running_mean, m0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn0.running_var, v0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_mean, m1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, v1, rtol=1e-4, atol=1e-5)
    assert model.bn0.momentum == 0.1  # restored


def test_recalibrate_restores_modes():
    model = _tiny().train()
    model.head.eval()
    recalibrate_bn(model, _x())
    assert model.training and not model.head.training and model.bn0.training


def test_bad_inputs():
    with pytest.raises(ValueError, match="2:4, 4:8, 4:8-T, block8x8"):
        parse_pattern("3:3")
    with pytest.raises(ValueError, match="unknown pattern 'foo'"):
        adaprune(_tiny(), _x(), "foo")
    model = _tiny()
    model.conv, model.bn1, model.fc1 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.Linear(12, 16)
    with pytest.raises(ValueError, match=r"layer 'fc1'.*dim 1 has size 12, not divisible by 8"):
        adaprune(model, _x(), "4:8", iters=1)
    with pytest.raises(ValueError, match=r"layer 'conv'.*dim 0 has size 12, not divisible by 8"):
        magnitude_prune(model, "4:8-T")
    adaprune(model, _x(), "2:4", iters=1)  # 12 is fine for groups of 4
    with pytest.raises(ValueError, match="layer 'conv'"):  # conv has 8 inputs: 8x8 blocks fit, 16x8 not
        magnitude_prune(_tiny(), "block16x16")
    with pytest.raises(ValueError, match="sparsity"):
        parse_pattern("block8x8", sparsity=1.5)
    with pytest.raises(ValueError, match="sparsity 0.75 does not apply to pattern 2:4"):
        parse_pattern("2:4", sparsity=0.75)
    assert parse_pattern("2:4", sparsity=0.5) == parse_pattern("2:4")  # its own sparsity is fine
    assert parse_pattern("4:8-t") == parse_pattern("4:8-T") and parse_pattern("Block8X8") == parse_pattern("block8x8")
    assert parse_pattern("block8x8").sparsity == 0.5
    with pytest.raises(ValueError, match="iters"):
        adaprune(_tiny(), _x(), "2:4", iters=-5)
    with pytest.raises(ValueError, match="batch"):
        adaprune(_tiny(), _x(), "2:4", batch=0)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    from nmsparse.train.config import load_config
    from nmsparse.train.loop import train

    out = tmp_path_factory.mktemp("digits")
    train(load_config("configs/digits-dense.yaml", ["epochs=3", "progress=false"]), out, log=lambda *a: None)
    return out / "checkpoint.pt"


def test_calibration_set_one_per_class(digits_ckpt):
    from nmsparse.train.evaluate import load_trained

    cfg, _, _, dev, _ = load_trained(digits_ckpt, "cpu")
    x, y = calibration_set(cfg.data, dev, 10)
    assert x.shape == (10, 1, 8, 8) and x.dtype == torch.float32
    assert sorted(y.tolist()) == list(range(10))
    x2, _ = calibration_set(cfg.data, dev, 10)
    assert torch.equal(x, x2)


@pytest.mark.parametrize("pattern", ["2:4", "block8x8"])
def test_prune_checkpoint_end_to_end(digits_ckpt, tmp_path, pattern):
    out = tmp_path / "pruned.pt"
    res = prune_checkpoint(digits_ckpt, pattern, calib=10, iters=50, out=out, device="cpu")
    assert res["adaprune_acc"] >= res["magnitude_acc"] - 1.0, res
    assert res["dense_acc"] > 80
    ckpt = load_checkpoint(out)  # a training checkpoint of plain modules
    assert ckpt["config"]["sparsity"] is None and ckpt["pruned"]["pattern"] == str(parse_pattern(pattern))
    state = ckpt["model"]
    w = state["features.3.weight"]
    if pattern == "2:4":
        assert is_nm(w, 2, 4, dim=1)
    else:
        assert _blocks_ok(w, 0.5)
    assert not list(tmp_path.glob("*.tmp*"))


def test_prune_command(digits_ckpt, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    out = tmp_path / "p.pt"
    args = parser.parse_args([str(digits_ckpt), "--pattern", "4:8-T", "--iters", "10", "--out", str(out),
                              "--device", "cpu"])
    assert prune_command(args) == 0
    assert "AdaPrune" in capsys.readouterr().out and out.exists()
    bad = parser.parse_args([str(digits_ckpt), "--pattern", "2:5x", "--out", str(out)])
    assert prune_command(bad) == 2
    assert "valid patterns are 2:4, 4:8, 4:8-T, block8x8" in capsys.readouterr().err
    missing = parser.parse_args([str(tmp_path / "nope.pt"), "--pattern", "2:4", "--out", str(out)])
    assert prune_command(missing) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_pruned_checkpoint_evaluates_and_compiles(digits_ckpt, tmp_path, capsys):
    """prune -> eval -> compile from the command line: the pruned file is an ordinary checkpoint."""
    from nmsparse.cli import main
    from nmsparse.compile import load_compact_state
    from nmsparse.train.evaluate import evaluate_checkpoint

    out = tmp_path / "pruned.pt"
    res = prune_checkpoint(digits_ckpt, "block8x8", calib=10, iters=20, out=out, device="cpu")
    assert evaluate_checkpoint(out, "cpu")["test_acc"] == pytest.approx(res["adaprune_acc"])
    assert main(["compile", str(out), "--target", "aie2", "--out", str(tmp_path / "build"), "--no-charts"]) == 0
    printed = capsys.readouterr().out
    assert "layers sparse" in printed
    state, info = load_compact_state(tmp_path / "build" / "model.safetensors")
    assert torch.equal(state["features.3.weight"], load_checkpoint(out)["model"]["features.3.weight"])
    assert any(v["format"] == "block" for v in info["layers"].values())


def test_magnitude_only(digits_ckpt, tmp_path, capsys):
    from nmsparse.train.evaluate import load_trained

    out = tmp_path / "mag.pt"
    res = prune_checkpoint(digits_ckpt, "2:4", calib=10, out=out, device="cpu", magnitude_only=True, log=print)
    assert "adaprune_acc" not in res and res["method"] == "magnitude"
    assert "magnitude only" in capsys.readouterr().out
    _, model, *_ = load_trained(digits_ckpt, "cpu")
    from nmsparse.nn.sparsify import squash

    squash(model)
    want = magnitude_prune(model, "2:4").state_dict()
    got = load_checkpoint(out)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_prune_refuses_bad_settings_before_work(digits_ckpt, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    cases = [
        ([str(digits_ckpt), "--pattern", "2:4", "--batch", "0"], "--batch"),
        ([str(digits_ckpt), "--pattern", "2:4", "--iters", "-5"], "--iters"),
        ([str(digits_ckpt), "--pattern", "2:4", "--calib", "0"], "--magnitude-only"),
        ([str(digits_ckpt), "--pattern", "2:4", "--sparsity", "0.75"], "does not apply to pattern 2:4"),
        ([str(digits_ckpt), "--pattern", "2:4", "--out", str(tmp_path / "adir")], "is a directory"),
        ([str(digits_ckpt), "--pattern", "2:4", "--out", str(tmp_path / "afile" / "x.pt")], "is a file"),
        ([str(digits_ckpt.parent), "--pattern", "2:4"], "pass the checkpoint.pt file"),
        ([str(junk), "--pattern", "2:4"], "cannot be loaded as a PyTorch checkpoint"),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(digits_ckpt), "--pattern", "2:4", "--device", "cuda"], "CUDA is not available"))
    for argv, msg in cases:
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "never.pt")]
        assert prune_command(parser.parse_args(argv)) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "never.pt").exists()


def test_calib_larger_than_dataset_is_reported(digits_ckpt, tmp_path):
    res = prune_checkpoint(digits_ckpt, "2:4", calib=100000, device="cpu", magnitude_only=True)
    assert res["calib"] < 100000 and res["calib_asked"] == 100000
    assert "asked 100000" in format_result(res)
