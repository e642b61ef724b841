"""Gradient fidelity: known answers (dense is itself; an unbiased method's bias is at its noise floor,
magnitude's is not), the command's files, and bad input."""

import math

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.cli import main
from nmsparse.models import build_from_record
from nmsparse.models.checkpoint import save_checkpoint
from nmsparse.train.config import load_config
from nmsparse.train.fidelity import gradient_fidelity

DIGITS = "configs/digits-dense.yaml"


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 5, 5, generator=g), torch.randint(0, 5, (6,), generator=g)


def test_dense_method_is_exact_and_the_model_is_untouched():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rows = nmsparse.gradient_fidelity(net, tiny_batch(), ["dense"], draws=3)
    assert [r["layer"] for r in rows] == ["0", "2", "4", "8"]
    for r in rows:
        assert r["cos_dw"] == pytest.approx(1, abs=1e-12) and r["bias_dw"] == 0 and r["relvar_dw"] == 0
        assert r["norm_dw"] == pytest.approx(1, abs=1e-12)
        if r["layer"] != "0":  # the input of layer 0 has no gradient
            assert r["cos_dx"] == pytest.approx(1, abs=1e-12) and r["bias_dx"] == 0
        else:
            assert math.isnan(r["cos_dx"])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_unbiased_bias_sits_at_its_noise_floor_and_magnitudes_does_not():
    """On the layers that prune (convs 2 and 4: > 3 input channels), mvue's and random-unbiased's
    bias of dX is within 4 noise floors (the floor sqrt(relvar / (K - 1)) is the standard error of
    the K-draw mean); magnitude's is far above its floor (zero: it is deterministic)."""
    rows = gradient_fidelity(tiny_net(), tiny_batch(), ["magnitude", "mvue", "random-unbiased"], draws=200,
                             n=1, m=4)
    by = {(r["method"], r["layer"]): r for r in rows}
    for method in ("mvue", "random-unbiased"):
        r = by[(method, "2")]  # layer 2's dX: its own pruned dY times W
        assert r["relvar_dx"] > 0 and r["bias_dx"] <= 4 * r["bias_floor_dx"]
        assert r["bias_excess_dx"] <= 0.5 * r["bias_dx"]
    assert by[("mvue", "2")]["relvar_dx"] < by[("random-unbiased", "2")]["relvar_dx"]
    assert by[("mvue", "2")]["cos_mean_dx"] > 0.99  # 200 draws average to the dense direction
    mag = by[("magnitude", "2")]
    assert mag["relvar_dx"] == pytest.approx(0, abs=1e-20) and mag["bias_dx"] > 1e-3
    assert mag["bias_excess_dx"] == pytest.approx(mag["bias_dx"])
    assert by[("magnitude", "8")]["cos_dw"] == pytest.approx(1)  # the top layer's dW is dense


def test_method_with_its_own_nm():
    rows = gradient_fidelity(tiny_net(), tiny_batch(), ["mvue:1:8", "mvue"], draws=2)
    assert {r["method"] for r in rows} == {"mvue 1:8", "mvue"}


def test_bad_input():
    net, batch = tiny_net(), tiny_batch()
    with pytest.raises(ValueError, match="did you mean 'mvue'"):
        gradient_fidelity(net, batch, ["mvu"])
    with pytest.raises(ValueError, match="draws"):
        gradient_fidelity(net, batch, ["mvue"], draws=0)
    with pytest.raises(ValueError, match="model: no SDGP-capable layer"):
        gradient_fidelity(nn.Sequential(nn.Flatten(), nn.Linear(75, 8)), batch, ["mvue"])


@pytest.mark.slow
def test_command_writes_table_csv_png(tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(["fidelity", "--config", DIGITS, "--methods", "dense", "mvue", "--draws", "2",
                 "--set", "progress=false", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| dense |" in text and "| mvue |" in text
    assert (out / "fidelity.csv").read_text().startswith("method,layer,kind,cos_dx,norm_dx")
    assert (out / "fidelity.png").stat().st_size > 1000 and (out / "fidelity.md").exists()


@pytest.mark.slow
def test_command_bad_input(tmp_path, capsys):
    assert main(["fidelity", "--config", DIGITS, "--draws", "0"]) == 2
    assert "--draws" in capsys.readouterr().err
    assert main(["fidelity", "--config", DIGITS, "--methods", "magnitud"]) == 2
    assert "did you mean 'magnitude'" in capsys.readouterr().err
    # a checkpoint whose model is another config's (a narrower CNN)
    cfg = load_config(DIGITS)
    record = {"name": "small_cnn", "kwargs": {"width": 16}, "sample_shape": [1, 8, 8], "num_classes": 10}
    ck = tmp_path / "other.pt"
    save_checkpoint(ck, {"model": build_from_record(record).state_dict(), "config": cfg.to_dict(),
                         "model_record": record, "epoch": 1})
    assert main(["fidelity", "--config", DIGITS, "--checkpoint", str(ck), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "another config" in err
