"""Running a compact model file: rebuild the architecture, load the weights, make the kept layers block-sparse.

``nmsparse compile`` stores, beside the weights, how to rebuild the architecture (the training
config of a checkpoint, or a model name). ``load_executable`` reads that back; for a model
compiled from a Python object, pass an instance of the same architecture as ``model``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..data import DataConfig, build_loaders
from ..models import build_from_record, build_model, evaluate, record_from_config
from .compiler import load_compact_state
from .runtime import build_executable

__all__ = ["load_executable", "rebuild_model", "evaluate_compiled"]


def rebuild_model(info: dict, where: str = "the compact file") -> nn.Module:
    """An untrained instance of the architecture recorded in a compact file's compile info."""
    arch = info.get("arch")
    if not arch:
        raise ValueError(f"{where} was compiled from a Python model object and does not record its architecture: "
                         f"pass model=<an instance of the same architecture> to load_executable")
    if arch.get("kind") == "checkpoint":
        # Files compiled before model records existed rebuild from the config and the stored sample shape.
        record = arch.get("model_record") or dict(record_from_config(arch["config"]),
                                                  sample_shape=list(arch["sample_shape"]))
        return build_from_record(record)
    if arch.get("kind") == "name":
        return build_model(arch["name"])
    raise ValueError(f"{where}: unknown architecture record {arch!r}")


def load_executable(path, model: nn.Module | None = None, backend: str = "auto") -> tuple[nn.Module, dict]:
    """(model in eval mode with the file's block-sparse layers on the CPU kernels, compile info).

    ``path``: a compact model file or the directory `nmsparse compile --out` wrote. Weights are the
    file's, bit-exact; layers the plan ran dense (format or measured fallback) stay dense modules.
    """
    state, info = load_compact_state(path)
    where = os.fspath(path)
    net = rebuild_model(info, where) if model is None else model
    want = net.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in sorted(set(state) & set(want))
              if state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shapes (file vs model) {shapes[:5]} (was it compiled from another architecture?)")
    net.load_state_dict(state)
    return build_executable(net, _runs_sparse(info), backend), info


def _runs_sparse(info: dict) -> list[str]:
    """Layers the plan runs on the block-sparse kernel."""
    return [name for name, layer in info["layers"].items() if layer["format"] == "block" and layer["decision"] == "sparse"]


@torch.no_grad()
def evaluate_compiled(path, backend: str = "auto", device: str = "cpu") -> dict:
    """Test accuracy of a compact model compiled from a checkpoint, on that checkpoint's test set."""
    net, info = load_executable(path, backend=backend)
    arch = info.get("arch") or {}
    if arch.get("kind") != "checkpoint":
        raise ValueError(f"{os.fspath(path)} was not compiled from a training checkpoint: no test set to evaluate on")
    cfg = arch["config"]
    dev = torch.device(device)
    _, test_loader = build_loaders(DataConfig(**cfg["data"]), dev)
    res = evaluate(net, test_loader, dev, None, cfg.get("tta_flip", False))
    return {**res, "name": cfg["name"], "sparse_layers": len(_runs_sparse(info)), "layers": len(info["layers"]), "target": info["target"]}
