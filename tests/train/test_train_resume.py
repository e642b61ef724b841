"""Resuming a run: a changed `epochs` is refused unless the result equals a fresh run; damaged checkpoints
get a clear message; --restart leaves the old run's files until the new run's first checkpoint."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from nmsparse.cli import main as cli
from nmsparse.train import loop
from nmsparse.train.checkpoint import check_config, config_differences, load_checkpoint, save_checkpoint
from nmsparse.train.config import load_config
from nmsparse.train.loop import train
from test_train_loop import stop_at  # Ctrl-C inside the loop

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "digits-dense.yaml"
QUIET = ["progress=false"]
FILES = ("checkpoint.pt", "config.yaml", "metrics.jsonl", "metrics.csv", "summary.json")


def run_files(run: Path) -> dict:
    return {name: (run / name).read_bytes() for name in FILES if (run / name).exists()}


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def cfg(*sets):
    return load_config(DIGITS, QUIET + list(sets))


@pytest.mark.slow
def test_fewer_epochs_than_done_is_refused_and_nothing_is_rewritten(tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg("epochs=2"), run, log=lambda *_: None)
    before = run_files(run)
    assert set(before) == set(FILES)
    with pytest.raises(ValueError, match=r"already has 2 epochs.*cannot become a 1-epoch run.*--out.*--restart"):
        train(cfg("epochs=1"), run, log=lambda *_: None)
    assert run_files(run) == before  # config.yaml still says 2 epochs, metrics keep their 2 rows
    assert cli(["train", "--config", str(DIGITS), "--out", str(run), "--set", "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmsparse train: error: checkpoint") and "already has 2 epochs" in err
    assert run_files(run) == before


def test_longer_run_under_a_length_dependent_schedule_is_refused(tmp_path):
    run = tmp_path / "run"
    train(cfg("epochs=1"), run, log=lambda *_: None)
    before = run_files(run)
    with pytest.raises(ValueError, match=r"epochs: 1 \(done: 1\) under the onecycle schedule.*depends on the run's "
                                         r"length.*Keep epochs: 1.*--restart"):
        train(cfg("epochs=3"), run, log=lambda *_: None)
    assert run_files(run) == before
    # An interrupted run asked to stop where it stopped would still have followed the longer run's lr curve.
    state = load_checkpoint(run / "checkpoint.pt")
    save_checkpoint(run / "checkpoint.pt", {**state, "config": {**state["config"], "epochs": 4.0}})
    with pytest.raises(ValueError, match=r"trained for epochs: 4 \(done: 1\) under the onecycle"):
        train(cfg("epochs=1"), run, log=lambda *_: None)


@pytest.mark.slow
def test_constant_schedule_extends_to_exactly_a_fresh_run(tmp_path):
    sets = ["schedule.name=constant", "optim.lr=0.02"]
    notes = []
    train(cfg("epochs=1", *sets), tmp_path / "ext", log=lambda *_: None)
    summary = train(cfg("epochs=3", *sets), tmp_path / "ext", log=notes.append)
    assert any("from 1 to 3 epochs" in n for n in notes)
    fresh = train(cfg("epochs=3", *sets), tmp_path / "fresh", log=lambda *_: None)
    assert metrics(tmp_path / "ext") == metrics(tmp_path / "fresh") and len(metrics(tmp_path / "ext")) == 3
    assert summary["final_test_acc"] == fresh["final_test_acc"] and summary["epochs"] == 3
    assert yaml.safe_load((tmp_path / "ext" / "config.yaml").read_text())["epochs"] == 3
    assert json.loads((tmp_path / "ext" / "summary.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_restart_keeps_the_old_run_until_the_new_first_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(cfg("epochs=2"), run, log=lambda *_: None)
    before = run_files(run)

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("epochs=1"), run, resume=False, log=lambda *_: None)
    assert run_files(run) == before  # interrupted before its first checkpoint: the 2-epoch run is intact
    monkeypatch.undo()
    summary = train(cfg("epochs=1"), run, resume=False, log=lambda *_: None)
    assert len(metrics(run)) == 1 and summary["epochs"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 1
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


@pytest.mark.slow
def test_default_run_passes_restart_through(tmp_path, capsys):
    out = str(tmp_path / "default")
    assert cli(["train", "--out", out, "--set", "epochs=1", "--set", "progress=false"]) == 0
    assert cli(["train", "--out", out, "--set", "epochs=2", "--set", "progress=false"]) == 2
    assert "under the onecycle schedule, whose learning rate depends" in capsys.readouterr().err
    assert cli(["train", "--out", out, "--set", "epochs=2", "--set", "progress=false", "--restart"]) == 0
    assert len(metrics(tmp_path / "default" / "digits-dense" / "seed0")) == 2


@pytest.mark.slow
def test_resume_after_a_metrics_row_was_lost_rewrites_metrics_from_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(cfg("epochs=2"), run, log=lambda *_: None)
    rows = metrics(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")  # a kill between the checkpoint and the metrics write
    train(cfg("epochs=2"), run, log=lambda *_: None)
    assert metrics(run) == rows and len((run / "metrics.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("size", [20000, 5000])
@pytest.mark.slow
def test_truncated_checkpoint_is_a_clear_error(tmp_path, capsys, size):
    run = tmp_path / "run"
    train(cfg("epochs=1"), run, log=lambda *_: None)
    ckpt = run / "checkpoint.pt"
    with open(ckpt, "r+b") as f:
        f.truncate(size)
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be loaded as a PyTorch checkpoint.*truncated"):
        load_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"truncated or corrupt.*--restart"):
        train(cfg("epochs=1"), run, log=lambda *_: None)
    assert cli(["eval", str(ckpt)]) == 2
    assert cli(["train", "--config", str(DIGITS), "--out", str(run), "--set", "epochs=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(f"{ckpt} cannot be loaded" in e and "truncated or corrupt" in e for e in err)
    assert ckpt.stat().st_size == size  # a failed resume never touches the checkpoint
    with pytest.raises(FileNotFoundError, match="nothere.pt does not exist"):
        load_checkpoint(tmp_path / "nothere.pt")


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.slow
def test_checkpoint_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        train(cfg("epochs=1"), tmp_path / "run", log=lambda *_: None)
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "run" / "checkpoint.pt").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "run" / "config.yaml").stat().st_mode)


def test_config_differences_name_only_what_differs():
    dense = cfg().to_dict()
    nm = cfg("sparsity.weight.kind=nm").to_dict()
    block = cfg("sparsity.weight.kind=block").to_dict()
    grad = cfg("sparsity.grad.method=rescale").to_dict()
    assert config_differences(nm, cfg("sparsity.weight.kind=nm", "optim.lr=0.2").to_dict()) == ["optim.lr: 0.1 -> 0.2"]
    # Another kind of weight sparsity: its other keys mean other things, so the kind alone is the difference.
    assert config_differences(nm, block) == ["sparsity.weight.kind: 'nm' -> 'block'"]
    # Dense to sparse, and weight to gradient sparsity: one line per section, not one per key inside it.
    diffs = config_differences(dense, grad)
    assert len(diffs) == 1 and diffs[0].startswith("sparsity: None -> {") and "grad: {n: 2, m: 4, method: rescale" in diffs[0]
    diffs = config_differences(nm, grad)
    assert [d.split(":")[0] for d in diffs] == ["sparsity.grad", "sparsity.weight"]
    assert diffs[0].startswith("sparsity.grad: None -> {n: 2") and diffs[1].endswith("-> None")
    assert config_differences(grad, cfg("sparsity.grad.method=random").to_dict()) == \
        ["sparsity.grad.method: 'rescale' -> 'random'"]
    with pytest.raises(ValueError, match=r"different config \(sparsity.weight.kind: 'nm' -> 'block'\); use the same"):
        check_config("run/checkpoint.pt", {"config": nm}, block)


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_mid_epoch_checkpoints_resume_bit_exact_and_a_truncated_one_falls_back(tmp_path, monkeypatch):
    # SR-STE weights (mask steps), SDGP random (a choice per step), augmentation: all must continue exactly.
    sets = ["epochs=2", "checkpoint_every_steps=5", "sparsity.weight.kind=nm", "sparsity.grad.method=random"]
    train(cfg(*sets), tmp_path / "ref", log=lambda *_: None)
    run = tmp_path / "run"
    stop_at(monkeypatch, 32)  # 23 steps per epoch: inside epoch 2, after the checkpoint of step 30
    with pytest.raises(KeyboardInterrupt) as e:
        train(cfg(*sets), run, log=lambda *_: None)
    assert isinstance(e.value, loop.TrainingInterrupted)
    assert str(e.value) == (f"interrupted; the last checkpoint is {run / 'checkpoint.pt'} (epoch 2, batch 7 of 23, "
                            f"step 30 of 46): the same command resumes it")
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, 30, 7) and len(metrics(run)) == 1
    assert load_checkpoint(run / "checkpoint.prev.pt")["step"] == 25  # the one before is kept
    assert not (run / "run.lock").exists()
    monkeypatch.undo()
    notes = []
    train(cfg(*sets), run, log=notes.append)
    assert any("resumed from" in n and "epoch 2, batch 7 of 23 (step 30)" in n for n in notes), notes
    assert same_weights(run / "checkpoint.pt", tmp_path / "ref" / "checkpoint.pt")
    assert metrics(run) == metrics(tmp_path / "ref")  # the resumed epoch's train loss too
    # A truncated checkpoint.pt: the previous one (step 45, inside epoch 2) takes over, as its message says.
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    notes.clear()
    train(cfg(*sets), run, log=notes.append)
    assert any("checkpoint.pt cannot be loaded as a PyTorch checkpoint; resuming from the previous checkpoint "
               in n and "checkpoint.prev.pt" in n for n in notes), notes
    assert same_weights(run / "checkpoint.pt", tmp_path / "ref" / "checkpoint.pt")
    assert metrics(run) == metrics(tmp_path / "ref")


@pytest.mark.slow
def test_checkpoints_every_few_minutes(tmp_path, monkeypatch):
    # A clock that moves a minute per reading: every step is past a 1-minute interval.
    ticks = iter(range(10**6))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: 60.0 * next(ticks))
    saved = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda path, state: (saved.append(state["step"]), real(path, state)))
    train(cfg("epochs=0.5", "checkpoint_every_minutes=1"), tmp_path / "run", log=lambda *_: None)
    assert saved == list(range(1, 12)) + [12]  # 12 steps: 11 inside the epoch, then its end
    train(cfg("epochs=0.5", "checkpoint_every_minutes=0"), tmp_path / "off", log=lambda *_: None)
    assert saved[12:] == [12]


@pytest.mark.slow
def test_a_checkpoint_from_before_optim_fused_resumes_with_the_fused_adamw(tmp_path):
    """A checkpoint written before optim.fused (no such config key; AdamW groups with fused=None) resumes: same
    config, and the run continues with the fused AdamW, saying so."""
    sets = ["optim.name=adamw", "optim.lr=0.001", "schedule.name=constant"]
    run = tmp_path / "run"
    train(cfg("epochs=1", *sets), run, log=lambda *_: None)
    state = load_checkpoint(run / "checkpoint.pt")
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    config = {**state["config"], "optim": {k: v for k, v in state["config"]["optim"].items() if k != "fused"}}
    groups = [{**g, "fused": None} for g in state["optimizer"]["param_groups"]]
    save_checkpoint(run / "checkpoint.pt", {**state, "config": config,
                                            "optimizer": {**state["optimizer"], "param_groups": groups}})
    notes = []
    summary = train(cfg("epochs=2", *sets), run, log=notes.append)
    assert any("the checkpoint's AdamW was not fused; this run's is" in n for n in notes)
    assert summary["epochs"] == 2 and len(metrics(run)) == 2
    assert all(g["fused"] for g in load_checkpoint(run / "checkpoint.pt")["optimizer"]["param_groups"])
