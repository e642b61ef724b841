"""Training a GPT on a text corpus: validation loss in the metrics and tables, exact resume, sparse variants."""

import csv
import json

import pytest
import torch
import yaml

from nmsparse.cli import main as cli
from nmsparse.models import load_model
from nmsparse.train.config import load_config
from nmsparse.train.loop import train
from test_train_loop import stop_at

TEXT = "".join(f"line {i}: to be, or not to be, that is the question.\n" for i in range(120))


def text_config(tmp_path, sparsity=None, **top):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    d = {"name": top.pop("name", "tiny gpt"), "epochs": 2, "progress": False,
         "data": {"name": "text", "path": str(corpus), "block_size": 16, "batch_size": 4, "steps_per_epoch": 5,
                  "test_batch_size": 16, "val_blocks": 6},
         "model": {"name": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 32}},
         "optim": {"name": "adamw", "lr": 3e-3, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0},
         "schedule": {"name": "cosine", "warmup_epochs": 0.4, "end_factor": 0.1},
         "checkpoint_every_steps": 3, **top}
    if sparsity:
        d["sparsity"] = sparsity
    path = tmp_path / f"{d['name'].replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_a_text_run_logs_validation_loss_and_the_last_eval_is_the_whole_split(tmp_path):
    cfg = load_config(text_config(tmp_path))
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_loss" in r and "val_ppl" in r for r in rows)
    assert summary["metric"] == "val_loss" and summary["final"] == rows[-1]["val_loss"]
    assert summary["best"] == min(r["val_loss"] for r in rows) and rows[-1]["val_loss"] < rows[0]["train_loss"]
    # the final row is the whole validation split, not the 6 sampled blocks
    from nmsparse.data import build_loaders
    from nmsparse.models import evaluate
    model, _ = load_model(tmp_path / "run" / "checkpoint.pt")
    _, test = build_loaders(cfg.data, torch.device("cpu"))
    assert evaluate(model, test.full(), "cpu")["val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-6)
    assert evaluate(model, test, "cpu")["val_loss"] != pytest.approx(rows[-1]["val_loss"], rel=1e-6)


@pytest.mark.parametrize("sparsity", [None, {"weight": {"kind": "nm", "n": 2, "m": 4}},
                                      {"grad": {"n": 2, "m": 4, "method": "mvue", "layers": "conv+linear"}}])
def test_resume_inside_an_epoch_is_exact(tmp_path, monkeypatch, sparsity):
    path = text_config(tmp_path, sparsity)
    full = train(load_config(path), tmp_path / "full")
    stop_at(monkeypatch, 7)  # after the step-6 checkpoint, inside epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(load_config(path), tmp_path / "cut")
    monkeypatch.undo()
    resumed = train(load_config(path), tmp_path / "cut")
    assert resumed["final"] == full["final"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compare_tables_validation_loss_and_perplexity(tmp_path, capsys):
    a = text_config(tmp_path)
    b = text_config(tmp_path, {"weight": {"kind": "nm", "n": 2, "m": 4}}, name="tiny gpt 2-4")
    out = tmp_path / "cmp"
    assert cli(["compare", str(a), str(b), "--seeds", "2", "--out", str(out)]) == 0
    table = (out / "compare.md").read_text()
    assert "val loss (nats/char) mean +- std | perplexity" in table and "| tiny gpt 2-4 | SR-STE 2:4 | 2:4 |" in table
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["metric"] for r in rows] == ["val_loss", "val_loss"] and len(rows[0]["values"].split()) == 2


def test_train_prints_the_validation_loss(tmp_path, capsys):
    assert cli(["train", "--config", str(text_config(tmp_path)), "--out", str(tmp_path / "r")]) == 0
    assert "final validation loss" in capsys.readouterr().out


def test_eval_and_report_of_a_text_run(tmp_path, capsys):
    run = tmp_path / "r"
    assert cli(["train", "--config", str(text_config(tmp_path)), "--out", str(run)]) == 0
    final = json.loads((run / "summary.json").read_text())["final_val_loss"]
    capsys.readouterr()
    assert cli(["eval", str(run / "checkpoint.pt")]) == 0
    out = capsys.readouterr().out
    assert f"validation loss {final:.4f} nats/char" in out and "perplexity" in out
    assert cli(["report", str(run)]) == 0
    assert "val_loss" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_prune_a_text_checkpoint_reports_validation_loss(tmp_path, capsys, method):
    run = tmp_path / "r"
    assert cli(["train", "--config", str(text_config(tmp_path)), "--out", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "pruned.pt"
    assert cli(["prune", str(run / "checkpoint.pt"), "--pattern", "2:4", "--method", method, "--calib", "6",
                "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dense" in text and "nats/char" in text and "+ BN" not in text  # a GPT has no batch norms
    model, _ = load_model(out)
    w = model.blocks[0].mlp.c_fc.weight
    assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
