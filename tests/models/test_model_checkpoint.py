"""Checkpoints rebuild their model from the recorded name and sample shape: no data loader, no data files."""

from __future__ import annotations

import pytest
import torch

import nmsparse.data
import nmsparse.data.build
import nmsparse.data.datasets
from nmsparse.compile import resolve_model
from nmsparse.models import (build_from_record, load_checkpoint, load_model, model_record, record_from_config,
                             save_checkpoint)
from nmsparse.models.checkpoint import FORMAT_VERSION
from nmsparse.train.config import load_config
from nmsparse.train.loop import train


@pytest.fixture(scope="module")
def sparse_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("srste")
    cfg = load_config("configs/digits-dense.yaml", ["epochs=1", "progress=false", "sparsity.weight.n=2",
                                                    "sparsity.weight.m=4"])
    train(cfg, out, log=lambda *a: None)
    return out / "checkpoint.pt"


def _no_data(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a data set was read to rebuild a model")
    for mod in (nmsparse.data, nmsparse.data.build, nmsparse.data.datasets):
        for name in ("load_dataset", "build_loaders"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)


def test_the_record_is_saved_and_rebuilds_without_data(sparse_ckpt, monkeypatch):
    state = load_checkpoint(sparse_ckpt)
    assert state["model_record"] == {"name": "small_cnn", "kwargs": state["config"]["model"]["kwargs"],
                                     "sample_shape": [1, 8, 8], "num_classes": 10}
    _no_data(monkeypatch)
    model, _ = load_model(sparse_ckpt)
    assert model.state_dict().keys() == state["model"].keys()  # sparsified as saved: masks and counters come back
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    compiled_from, shape, _ = resolve_model(sparse_ckpt)
    assert shape == (1, 1, 8, 8)


def test_a_checkpoint_without_record_rebuilds_from_its_config(sparse_ckpt, tmp_path, monkeypatch):
    state = load_checkpoint(sparse_ckpt)
    old = {k: v for k, v in state.items() if k not in ("model_record", "format_version")}
    save_checkpoint(tmp_path / "old.pt", old)
    _no_data(monkeypatch)
    model, _ = load_model(tmp_path / "old.pt")
    assert record_from_config(state["config"]) == state["model_record"]
    x = torch.randn(2, 1, 8, 8)
    reference, _ = load_model(sparse_ckpt)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x))


def test_record_builds_the_named_model():
    net = build_from_record(model_record("mlp", {"hidden": [32]}, (1, 8, 8), 7))
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 7)


def test_foreign_and_incomplete_files_are_refused(tmp_path):
    torch.save({"format_version": FORMAT_VERSION, "weights": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="holds no config/model"):
        load_model(tmp_path / "x.pt")
    torch.save([1, 2], tmp_path / "y.pt")
    with pytest.raises(ValueError, match="not an nmsparse training checkpoint"):
        load_model(tmp_path / "y.pt")
