"""Where a model to compile comes from: an nn.Module, a checkpoint (read through models/), or a model name."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..common.text import did_you_mean
from ..models import MODELS, build_model, load_model, record_from_config
from ..prune.magnitude import prune_blocks

__all__ = ["resolve_model", "resolve_source", "DEFAULT_INPUT_SHAPES"]

# Example input shapes for the registered model names (CLI: MODEL given by name).
DEFAULT_INPUT_SHAPES = {"resnet50": (1, 3, 224, 224), "resnet18": (1, 3, 224, 224), "regnetx_400mf": (1, 3, 224, 224),
                        "vgg16": (1, 3, 224, 224), "resnet9": (1, 3, 32, 32), "small_cnn": (1, 1, 28, 28),
                        "mlp": (1, 784), "vit_tiny": (1, 3, 32, 32)}


def _parse_shape(shape) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if isinstance(shape, str):
        try:
            shape = tuple(int(s) for s in shape.replace("x", ",").split(",") if s.strip())
        except ValueError:
            raise ValueError(f"input shape must be comma-separated integers such as 1,3,224,224, got {shape!r}") from None
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input shape must be positive integers such as 1,3,224,224, got {shape!r}")
    return shape


def resolve_model(model_or_path, input_shape=None, prune: float | None = None, block=(8, 8), seed: int = 0):
    """(model, input shape, description) from an nn.Module, a checkpoint path or a model name.

    A name is one of models.MODELS, built with its default arguments and random
    weights drawn from ``seed`` (useful with ``prune``). A checkpoint is one written by
    ``nmsparse train`` or ``nmsparse prune``.
    """
    return resolve_source(model_or_path, input_shape, prune, block, seed)[:3]


def resolve_source(model_or_path, input_shape=None, prune: float | None = None, block=(8, 8), seed: int = 0):
    """resolve_model plus the architecture record stored in the compact file (None for a module)."""
    shape = _parse_shape(input_shape)
    arch = None
    if isinstance(model_or_path, nn.Module):
        model, desc = model_or_path, type(model_or_path).__name__
    else:
        text = os.fspath(model_or_path)
        if os.path.exists(text):
            model, record, cfg = _from_checkpoint(text)
            shape = shape or (1, *record["sample_shape"])
            desc = text
            arch = {"kind": "checkpoint", "config": dict(cfg, sparsity=None), "sample_shape": list(shape[1:]),
                    "model_record": record}
        elif text in MODELS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build_model(text)
            desc = f"{text} (random weights, seed {seed})"
            shape = shape or DEFAULT_INPUT_SHAPES.get(text)
            arch = {"kind": "name", "name": text}
        else:
            names = sorted(MODELS)
            hint = did_you_mean(text, names) or "."
            raise ValueError(f"model {text!r} is neither an existing file nor a known model name{hint} "
                             f"Known names: {', '.join(names)}.")
    if shape is None:
        raise ValueError(f"no input shape for {desc}: pass one (CLI: --input-shape 1,3,224,224)")
    if prune:
        names = prune_blocks(model, prune, block)
        desc += f", {prune:.0%} of {block[0]}x{block[1]} blocks pruned in {len(names)} layers"
    return model, shape, desc, arch


def _from_checkpoint(path: str):
    """(model on the CPU, its model record, its training config) of a checkpoint of nmsparse train or prune."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory: pass a checkpoint.pt (from nmsparse train or prune), or a model "
                         f"name with --prune")
    try:
        model, state = load_model(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{e} (nmsparse compile takes a checkpoint written by `nmsparse train` or `nmsparse "
                         f"prune`, or a model name with --prune)") from None
    return model.cpu(), state.get("model_record") or record_from_config(state["config"]), state["config"]
