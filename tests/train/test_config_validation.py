"""Config values that types alone allow but training cannot use fail at load time, naming the key and what works."""

from pathlib import Path

import pytest

from nmsparse.cli import main as cli
from nmsparse.train.config import load_config
from nmsparse.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "digits-dense.yaml"

BAD = {
    "data.name=fmnist": r"config.data.name must be one of digits, mnist, fashion-mnist, cifar10, imagefolder, "
                        r"tinyshakespeare, text, got 'fmnist'; did you mean 'fashion-mnist'\?",
    "data.name=fashion_mnist": r"did you mean 'fashion-mnist'\?",
    "data.name=cifar": r"did you mean 'cifar10'\?",
    "amp=fp8": r"config.amp must be one of auto, bf16, fp16, off, got 'fp8'",
    "data.batch_size=0": r"config.data.batch_size must be at least 1, got 0",
    "data.test_batch_size=-5": r"config.data.test_batch_size must be at least 1, got -5",
    "eval_every=0": r"config.eval_every must be at least 1",
    "data.translate=-2": r"config.data.translate must be at least 0 .*got -2",
    "data.cutout=-1": r"config.data.cutout must be at least 0",
    "data.workers=-1": r"config.data.workers must be at least 0",
    "data.image_size=0": r"config.data.image_size must be at least 1",
    "epochs=0": r"config.epochs must be a number > 0",
    "epochs=-1": r"config.epochs must be a number > 0 .*got -1.0",
    "epochs=.inf": r"config.epochs must be a number > 0",
    "seed=-1": r"config.seed must be at least 0",
    "checkpoint_every_steps=-1": r"config.checkpoint_every_steps must be at least 0 \(0: only at epoch ends\)",
    "checkpoint_every_minutes=-5": r"config.checkpoint_every_minutes must be a finite number >= 0 \(0 is off\)",
    "optim.name=adam": r"config.optim.name must be one of sgd, adamw, got 'adam'; did you mean 'adamw'\?",
    "optim.lr=0": r"config.optim.lr must be a finite number > 0, got 0.0",
    "optim.lr=.nan": r"config.optim.lr must be a finite number > 0, got nan",
    "optim.momentum=1.5": r"config.optim.momentum must be in \[0, 1\), got 1.5",
    "optim.weight_decay=-1e-4": r"config.optim.weight_decay must be a finite number >= 0",
    "optim.label_smoothing=1": r"config.optim.label_smoothing must be in \[0, 1\), got 1.0",
    "schedule.name=cos": r"config.schedule.name must be one of triangular, onecycle, cosine, constant, got 'cos'; "
                         r"did you mean 'cosine'\?",
    "schedule.warmup_epochs=-1": r"config.schedule.warmup_epochs must be a finite number >= 0",
    "schedule.start_factor=2": r"config.schedule.start_factor must be in \[0, 1\]",
    "schedule.end_factor=-0.1": r"config.schedule.end_factor must be in \[0, 1\]",
    "model.name=resnet": r"config.model: unknown model 'resnet'; did you mean 'resnet9'\?",
    "model.kwargs.widht=8": r"config.model: model 'small_cnn' got an unexpected argument 'widht'; "
                            r"did you mean 'width'\?",
    "optim.lr.x=1": r"--set optim.lr.x=1: optim.lr is a value \(0.1\), not a section",
    "sparsity.grad=3": r"sparsity.grad must be a mapping",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_value_names_the_key(override):
    # A bad --set value is blamed on that --set option, not on the (valid) YAML file.
    with pytest.raises(ValueError, match=BAD[override]) as e:
        load_config(DIGITS, ["optim.nesterov=false", override])
    assert f"--set {override}" in str(e.value) and "digits-dense.yaml" not in str(e.value)
    assert "nesterov" not in str(e.value)  # the other, valid, --set is not blamed


def test_a_bad_file_is_blamed_on_the_file_and_a_bad_set_on_the_set(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS.read_text() + "eval_every: 0\n")
    with pytest.raises(ValueError, match=r"config.eval_every must be at least 1.* in .*bad.yaml") as e:
        load_config(bad, ["optim.lr=0.05"])
    assert "--set" not in str(e.value)
    assert load_config(bad, ["eval_every=2"]).eval_every == 2  # a --set that fixes the file is fine
    # Messages that do not spell the key (n larger than m) still name the --set options that cause them.
    with pytest.raises(ValueError, match=r"n must be <= m.*\(from --set sparsity.grad.n=3, --set sparsity.grad.m=2\)$"):
        load_config(DIGITS, ["optim.lr=0.05", "sparsity.grad.n=3", "sparsity.grad.m=2"])
    with pytest.raises(ValueError, match=r"n must be <= m.*\(from --set sparsity.grad.n=5\)$"):
        load_config(DIGITS, ["sparsity.grad.n=5", "sparsity.grad.m=4"])  # m=4 is the default: not to blame


@pytest.mark.parametrize("override", ["data.name=fmnist", "amp=fp8", "data.batch_size=0", "eval_every=0",
                                      "data.translate=-2", "epochs=0", "epochs=-1", "model.kwargs.foo=1"])
def test_cli_prints_one_line_and_writes_nothing(tmp_path, capsys, override):
    out = tmp_path / "run"
    assert cli(["train", "--config", str(DIGITS), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmsparse train: error: config.") and "Traceback" not in err and err.count("\n") == 1
    assert f"(from --set {override})" in err and "digits-dense.yaml" not in err
    assert not out.exists()  # no summary.json with a null accuracy, no config.yaml


def test_default_run_validates_before_training(tmp_path, capsys):
    assert cli(["train", "--out", str(tmp_path / "d"), "--set", "data.batch_size=0"]) == 2
    assert "config.data.batch_size must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_compare_seeds_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["compare", str(DIGITS), "--seeds", "0", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "--seeds: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_yaml_spellings_that_are_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(DIGITS.read_text() + "amp: off\n")  # YAML 1.1 reads a bare off as false
    assert load_config(path).amp == "off"
    cfg = load_config(DIGITS, ["optim.lr=1e-3", "optim.weight_decay=5e-5"])  # YAML 1.1 reads these as strings
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-5
    with pytest.raises(ValueError, match=r"config.optim.lr must be float, got 'fast'"):
        load_config(DIGITS, ["optim.lr=fast"])


def test_translate_must_be_smaller_than_the_image(tmp_path):
    cfg = load_config(DIGITS, ["data.translate=8", "epochs=1"])
    with pytest.raises(ValueError, match=r"config.data.translate must be less than the image side \(8 pixels "
                                         r"for digits\), got 8"):
        train(cfg, tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_sparsity_overrides_are_named_in_the_run_name():
    assert load_config(DIGITS).name == "digits dense"
    assert load_config(DIGITS, ["optim.lr=0.05"]).name == "digits dense"
    cfg = load_config(DIGITS, ["sparsity.grad.n=1", "sparsity.grad.m=4", "optim.lr=0.05"])
    assert cfg.name == "digits dense [sparsity.grad.n=1, sparsity.grad.m=4]" and cfg.sparsity.grad.n == 1
    assert load_config(DIGITS, ["sparsity.grad.n=1", "name=mine"]).name == "mine"


def test_training_flushes_subnormal_floats_unless_the_config_says_not(monkeypatch):
    """flush_denormal (default true) holds for the run, and the caller's mode is back afterwards."""
    import torch

    import nmsparse.train.loop as loop
    from nmsparse.common.system import flush_denormal, flushes_denormals

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals (torch.set_flush_denormal)")
    assert load_config().flush_denormal is True and not flushes_denormals()
    seen = []
    monkeypatch.setattr(loop, "_train", lambda cfg, *a: seen.append(flushes_denormals()) or {})
    for flag in ("true", "false"):
        loop.train(load_config(overrides=[f"flush_denormal={flag}"]))
        assert not flushes_denormals()  # the caller's mode again
    with flush_denormal(True):
        loop.train(load_config(overrides=["flush_denormal=false"]))
        assert flushes_denormals()
    assert seen == [True, False, False] and not flushes_denormals()
    with pytest.raises(ValueError, match="flush_denormal"):
        load_config(overrides=["flush_denormal=sometimes"])
