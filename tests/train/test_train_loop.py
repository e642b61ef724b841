"""The training engine: configs, schedules, weight decay groups, logs, exact resume, faults, commands."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from nmsparse.cli import main as cli
from nmsparse.train import loop
from nmsparse.train.checkpoint import load_checkpoint
from nmsparse.train.config import OptimConfig, load_config
from nmsparse.train.loop import train
from nmsparse.train.optim import build_optimizer, param_groups
from nmsparse.train.schedule import lr_factor

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "digits-dense.yaml"


def quick(tmp_path, name="cfg.yaml", **changes):
    """A digits config file with small overrides (dotted keys)."""
    d = yaml.safe_load(DIGITS.read_text())
    d.update({"epochs": 2, "progress": False})
    for key, value in changes.items():
        node = d
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return path


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 0.1, momentun: 0.9}\n")
    with pytest.raises(ValueError, match=r"optim.momentun; did you mean 'momentum'.*bad.yaml"):
        load_config(bad)
    bad.write_text("epochs: ten\n")
    with pytest.raises(ValueError, match=r"config.epochs must be float"):
        load_config(bad)
    bad.write_text("sparsity: {grad: {n: 2, m: 4, methd: rescale}}\n")
    with pytest.raises(ValueError, match=r"sparsity.grad.methd"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")
    cfg = load_config(DIGITS, ["optim.lr=0.05", "sparsity.grad.method=random", "sparsity.grad.n=1"])
    assert cfg.optim.lr == 0.05 and cfg.sparsity.grad.method == "random" and cfg.sparsity.grad.n == 1


def test_schedules():
    tri = [lr_factor("triangular", s, 100, 10) for s in range(101)]
    assert tri[0] == 0 and tri[10] == 1 and tri[100] == 0 and abs(tri[55] - 0.5) < 1e-9
    cos = [lr_factor("cosine", s, 100, 10, start=0.1) for s in range(101)]
    assert abs(cos[0] - 0.1) < 1e-9 and cos[10] == 1 and cos[100] < 1e-9
    one = [lr_factor("onecycle", s, 100, 0) for s in range(101)]
    assert max(one) == one[30] == 1 and one[0] == 0
    with pytest.raises(ValueError, match="schedule.name"):
        lr_factor("step", 0, 10, 0)


def test_weight_decay_skips_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2), nn.LayerNorm(2))
    decay, no_decay = param_groups(model, 5e-4)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert no_decay["weight_decay"] == 0 and len(no_decay["params"]) == 6


def test_adamw_is_fused_where_every_parameter_allows_it():
    """Fused AdamW (not the for-each one, whose CPU sqrt is slow on a frozen mask's zero state) where torch takes
    every parameter; the same update as the for-each AdamW to rounding; optim.fused=false or a meta parameter
    keep torch's default."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).double()
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert all(g["fused"] for g in fused.param_groups)
    twin = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).double()
    twin.load_state_dict(model.state_dict())
    plain = build_optimizer(twin, OptimConfig(name="adamw", lr=0.1, weight_decay=0.1, fused=False))
    assert not any(g["fused"] for g in plain.param_groups)
    x = torch.randn(4, 8, dtype=torch.float64)
    for _ in range(3):
        for net, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            net(x).square().sum().backward()
            net[0].weight.grad[:, ::2] = 0  # zero gradients, as a frozen mask's pruned weights get
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    meta = build_optimizer(nn.Linear(4, 4, device="meta"), cfg)
    assert not any(g["fused"] for g in meta.param_groups)


@pytest.mark.slow
def test_train_writes_logs_checkpoint_and_summary(tmp_path):
    cfg = load_config(quick(tmp_path), ["sparsity.grad.method=rescale"])
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("test_acc" in r for r in rows)
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss")
    assert summary["final_test_acc"] == rows[-1]["test_acc"] > 80
    assert summary["pattern"] == "SDGP rescale 2:4" and len(summary["sparsity"]) == 2
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["sparsity"]["grad"]["method"] == "rescale"


def _run_cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "nmsparse.cli", *args], env=env, **kw)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_exact(tmp_path):
    cfg_path = quick(tmp_path, epochs=4, data__batch_size=16,
                     sparsity={"weight": {"kind": "nm", "n": 2, "m": 4}, "grad": {"method": "random"}})
    # Same process setup for both runs (thread count changes float reduction order).
    assert _run_cli(["train", "--config", str(cfg_path), "--out", str(tmp_path / "ref")],
                    stdout=subprocess.DEVNULL).wait() == 0
    run = tmp_path / "killed"
    proc = _run_cli(["train", "--config", str(cfg_path), "--out", str(run)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.01)
    time.sleep(0.05)  # well inside epoch 2 (an epoch takes ~1 s here)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 4, "the kill should land before the run finished"
    assert _run_cli(["train", "--config", str(cfg_path), "--out", str(run)], stdout=subprocess.DEVNULL).wait() == 0
    a = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)


@pytest.mark.slow
def test_resume_refuses_other_config_and_truncated_checkpoint(tmp_path):
    cfg_path = quick(tmp_path, epochs=1)
    run = tmp_path / "run"
    train(load_config(cfg_path), run, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"different config \(optim.lr: 0.1 -> 0.2\)"):
        train(load_config(cfg_path, ["optim.lr=0.2"]), run, log=lambda *_: None)
    good = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be loaded as a PyTorch checkpoint.*truncated or corrupt"):
        train(load_config(cfg_path), run, log=lambda *_: None)
    assert cli(["eval", str(run / "checkpoint.pt")]) == 2  # clear message, exit 2, no traceback


def test_missing_data_path_is_a_clear_error(tmp_path):
    cfg = load_config(quick(tmp_path), ["data.name=fashion-mnist", f"data.root={tmp_path / 'nodata'}"])
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz"):
        train(cfg, None, log=lambda *_: None)


@pytest.mark.slow
def test_eval_report_and_compare_commands(tmp_path, capsys):
    cfg_path = quick(tmp_path, epochs=1, sparsity={"weight": {"kind": "nm", "n": 2, "m": 4}})
    run = tmp_path / "run"
    assert cli(["train", "--config", str(cfg_path), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert cli(["eval", str(run / "checkpoint.pt"), "--device", "cpu"]) == 0
    assert f"test top-1 {summary['final_test_acc']:.2f}%" in capsys.readouterr().out
    assert cli(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| epoch |" in out and "2:4 srste" in out
    assert (run / "curves.png").stat().st_size > 1000 and (run / "masks.png").stat().st_size > 1000
    assert cli(["compare", str(cfg_path), "--seeds", "2", "--sweep", "sparsity.weight.nm=1:4,2:4",
                "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.endswith("| 2 |")]  # 2 seeds each
    assert len(rows) == 2 and "SR-STE 1:4" in rows[0] and "SR-STE 2:4" in rows[1]
    assert (tmp_path / "cmp" / "compare.png").exists()


def fake_run(run: Path, **sets) -> Path:
    """A run directory as nmsparse train leaves it, without training: an untrained model's checkpoint, one row."""
    from nmsparse.models import build_from_record
    from nmsparse.train.checkpoint import save_checkpoint
    from nmsparse.train.loop import record_for

    cfg = load_config(DIGITS, [f"{k}={v}" for k, v in sets.items()])
    record = record_for(cfg, (1, 8, 8))
    save_checkpoint(run / "checkpoint.pt", {"model": build_from_record(record).state_dict(), "config": cfg.to_dict(),
                                            "model_record": record, "epoch": 1, "step": 23, "history": []})
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 23, "train_loss": 2.0, "test_acc": 10.0}) + "\n")
    return run


@pytest.mark.slow
def test_report_takes_a_checkpoint_for_its_run_directory(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    assert cli(["report", str(run / "checkpoint.pt")]) == 0  # the checkpoint's run directory
    out = capsys.readouterr().out
    assert f"# Run {run}" in out and "| epoch |" in out


def test_report_of_a_file_says_what_it_takes(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    assert cli(["report", str(run / "metrics.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl is a file, not a run directory" in err and "does not exist" not in err
    other = tmp_path / "pruned.pt"
    other.write_bytes((run / "checkpoint.pt").read_bytes())
    assert cli(["report", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} has no metrics.jsonl" in err and "nmsparse eval" in err
    assert cli(["report", str(tmp_path / "absent")]) == 2
    assert "run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_ddp_training(tmp_path):
    cfg_path = quick(tmp_path, epochs=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "nmsparse.cli", "train", "--config", str(cfg_path), "--out", str(tmp_path / "ddp"),
                          "--set", "sparsity.grad.method=rescale", "--set", "checkpoint_every_steps=5"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # rank 0 alone writes
    # Checkpoints inside epochs gather every rank's loss so far; the last one before the end is kept.
    prev = load_checkpoint(tmp_path / "ddp" / "checkpoint.prev.pt")
    assert prev["step"] == 20 and prev["epoch_partial"]["seen"].tolist() == [8 * 64, 8 * 64]
    assert not (tmp_path / "ddp" / "run.lock").exists()
    # Each rank sees half an epoch per epoch: 1437 images / 2 ranks / 64 per batch = 12 steps.
    # Half the steps of one process at twice the batch: it learns, a little slower.
    assert rows[-1]["step"] == 24 and rows[-1]["test_acc"] > 60
    finals = [line for line in res.stdout.splitlines() if "final test top-1" in line]
    assert len(finals) == 1 and f"final test top-1 {rows[-1]['test_acc']:.2f}%" in finals[0]  # rank 0 alone prints


def stop_at(monkeypatch, at_step: int) -> None:
    """Ctrl-C just before step `at_step` (a KeyboardInterrupt raised inside the training loop)."""
    real = loop.lr_factor

    def lr_factor(name, step, *args):
        if step == at_step:
            raise KeyboardInterrupt
        return real(name, step, *args)

    monkeypatch.setattr(loop, "lr_factor", lr_factor)


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    cfg_path = quick(tmp_path, epochs=1, checkpoint_every_steps=2)
    run = tmp_path / "run"
    stop_at(monkeypatch, 5)
    assert cli(["train", "--config", str(cfg_path), "--out", str(run)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nmsparse train: interrupted; the last checkpoint is {run / 'checkpoint.pt'} (epoch 1, batch 4 "
                   f"of 23, step 4 of 23): the same command resumes it"]
    stop_at(monkeypatch, 0)  # before any checkpoint
    assert cli(["train", "--config", str(cfg_path), "--out", str(tmp_path / "new")]) == 130
    assert "interrupted before the first checkpoint: nothing saved in" in capsys.readouterr().err
    assert cli(["train", "--config", str(cfg_path), "--out", str(run), "--restart"]) == 130
    assert "still holds the earlier run" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4


@pytest.fixture
def sigint_default():
    """Ctrl-C as in a terminal. A test process started in the background by a non-interactive shell
    (``cmd &``) inherits SIGINT ignored, which the loop rightly respects; these tests need it delivered."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.slow
def test_sigint_in_a_real_process(tmp_path):
    cfg_path = quick(tmp_path, epochs=50, checkpoint_every_steps=3)
    run = tmp_path / "run"
    proc = _run_cli(["train", "--config", str(cfg_path), "--out", str(run)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see sigint_default
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"nmsparse train: interrupted; the last checkpoint is {run}") and "same command" in err
    assert not (run / "run.lock").exists()


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    from nmsparse.train.runlock import RunLock

    cfg_path = quick(tmp_path, epochs=0.1)
    run = tmp_path / "run"
    with RunLock(run):  # a run in progress (this process's PID: flock refuses a second holder all the same)
        with pytest.raises(OSError, match=rf"another nmsparse run \(PID {os.getpid()}\) is training into {run}: "
                                          r"wait for it to finish or stop it, or use another --out"):
            train(load_config(cfg_path), run, log=lambda *_: None)
        assert cli(["train", "--config", str(cfg_path), "--out", str(run)]) == 2
        assert "another nmsparse run" in capsys.readouterr().err
        assert not (run / "checkpoint.pt").exists()
    # The lock file of a process that died (killed, machine crash) is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.lock").write_text(f"{dead.pid} host\n")
    train(load_config(cfg_path), run, log=lambda *_: None)
    assert (run / "checkpoint.pt").exists() and not (run / "run.lock").exists()


def test_progress_lines_when_output_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "PROGRESS_EVERY_S", 0.0)  # every step, instead of every 30 s
    monkeypatch.setattr(loop, "_on_terminal", lambda: False)
    lines = []
    train(load_config(quick(tmp_path, epochs=0.2, progress=True)), None, log=lines.append)
    progress = [x for x in lines if "images/s" in x]
    assert [x.split(", ")[1] for x in progress] == [f"step {s}/5" for s in range(1, 6)]
    assert all(x.startswith("digits dense: epoch 1/1, step") and ", loss " in x for x in progress)
    lines.clear()
    train(load_config(quick(tmp_path, epochs=0.2, progress=False)), None, log=lines.append)
    assert not [x for x in lines if "images/s" in x]  # progress: false is quiet
    monkeypatch.setattr(loop, "_on_terminal", lambda: True)  # a terminal gets tqdm's bar instead
    train(load_config(quick(tmp_path, epochs=0.2, progress=True)), None, log=lines.append)
    assert not [x for x in lines if "images/s" in x]


def test_the_loop_attaches_weight_masks_to_its_optimizer(tmp_path, monkeypatch):
    handles = []
    real = loop.attach
    monkeypatch.setattr(loop, "attach", lambda model, opt: handles.append(real(model, opt)) or handles[-1])
    cfg = load_config(quick(tmp_path, epochs=0.2, sparsity={"weight": {"kind": "nm", "n": 2, "m": 4}}))
    train(cfg, tmp_path / "run", log=lambda *_: None)
    assert len(handles) == 1 and handles[0] is not None  # masks step once per optimizer step
    model = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    steps = [int(meta["nmsparse"]["weight"]["step"]) for meta in model._metadata.values() if "nmsparse" in meta]
    assert steps and set(steps) == {5}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost KeyboardInterrupt
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, monkeypatch, sigint_default):
    """Python loses the KeyboardInterrupt of a SIGINT that lands in a __del__ ("Exception ignored"); the loop
    remembers the Ctrl-C and stops at the next step anyway."""
    cfg_path = quick(tmp_path, epochs=1, checkpoint_every_steps=2)
    real = loop.lr_factor

    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler's KeyboardInterrupt is raised, and ignored, here

    def lr_factor(name, step, *args):
        if step == 5:
            Finalizer()
        return real(name, step, *args)

    monkeypatch.setattr(loop, "lr_factor", lr_factor)
    with pytest.raises(loop.TrainingInterrupted, match="the last checkpoint is"):
        train(load_config(cfg_path), tmp_path / "run", log=lambda *_: None)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 6  # the step under way finished


def test_a_resumed_optimizer_keeps_this_runs_fused_choice():
    """A checkpoint's param_groups carry the writing run's `fused` (none before optim.fused): after loading, each
    group gets back what build_optimizer chose, and its step counters where that kernel wants them; the next
    steps equal a for-each AdamW's to rounding."""
    from nmsparse.train.optim import keep_fused_choice

    torch.manual_seed(0)
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.1)
    old = nn.Linear(8, 8).double()
    old_opt = build_optimizer(old, OptimConfig(name="adamw", lr=0.1, weight_decay=0.1, fused=False))
    x = torch.randn(4, 8, dtype=torch.float64)

    def step(net, opt):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()

    step(old, old_opt)
    new = nn.Linear(8, 8).double()
    new.load_state_dict(old.state_dict())
    new_opt = build_optimizer(new, cfg)
    chosen = [g["fused"] for g in new_opt.param_groups]
    new_opt.load_state_dict(copy.deepcopy(old_opt.state_dict()))  # loading keeps same-device tensors: no sharing
    assert not any(g["fused"] for g in new_opt.param_groups)  # torch takes the checkpoint's setting
    assert keep_fused_choice(new_opt, chosen) and all(g["fused"] for g in new_opt.param_groups)
    assert not keep_fused_choice(new_opt, chosen)  # nothing left to change
    for st in new_opt.state.values():
        assert st["step"].dtype == torch.float32 and int(st["step"]) == 1
    for _ in range(2):
        step(old, old_opt)
        step(new, new_opt)
    for a, b in zip(old.parameters(), new.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    back = build_optimizer(nn.Linear(8, 8).double(), OptimConfig(name="adamw", fused=False))
    back.load_state_dict(copy.deepcopy(new_opt.state_dict()))
    assert keep_fused_choice(back, [None, None]) and not any(g["fused"] for g in back.param_groups)
