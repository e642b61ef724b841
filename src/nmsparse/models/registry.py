"""The model registry: a name to its builder. A new model is one file in models/ plus one line here."""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

from torch import nn

from .gpt import GPT
from .resnet import ResNet9, regnetx_400mf, resnet18, resnet50
from .small import MLP, SmallCNN
from .vgg import vgg16
from .vit import ViT, vit_tiny

__all__ = ["MODELS", "build_model", "model_argument_error", "build_for_data"]


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet9": ResNet9,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "regnetx_400mf": regnetx_400mf,
    "small_cnn": SmallCNN,
    "mlp": MLP,
    "vit_tiny": vit_tiny,
    "vit": ViT,
    "vgg16": vgg16,
    "gpt": GPT,
}


def model_argument_error(name: str, kwargs: dict) -> str | None:
    """Why `name` with `kwargs` cannot be built (unknown model or argument, with a suggestion), or None."""
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        return f"unknown model {name!r}{hint} Known models: {', '.join(MODELS)}"
    params = [p for p in inspect.signature(MODELS[name]).parameters if p != "self"]
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            return f"model {name!r} got an unexpected argument {key!r}{hint} Valid arguments: {', '.join(params)}"
    return None


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ValueError for an unknown name, TypeError (naming the model) for bad kwargs."""
    problem = model_argument_error(name, kwargs)
    if problem:
        raise (ValueError if name not in MODELS else TypeError)(problem)
    return MODELS[name](**kwargs)


def build_for_data(name: str, kwargs: dict, sample_shape, num_classes: int) -> nn.Module:
    """Build model `name` for samples of shape (C, H, W) (images) or (T,) (token sequences) and `num_classes`
    classes (the vocabulary of a language model).

    The classes, input channels, image size and flattened input size (or vocabulary and block size) are passed
    to the builder where it takes them, unless `kwargs` sets them.
    """
    accepted = inspect.signature(MODELS.get(name, build_model)).parameters
    if len(sample_shape) == 1:
        derived = {"vocab_size": num_classes, "block_size": int(sample_shape[0])}
    else:
        c, h, w = tuple(sample_shape)
        derived = {"num_classes": num_classes, "in_channels": c, "image_size": h, "in_features": c * h * w}
    full = {k: v for k, v in derived.items() if k in accepted}
    full.update(kwargs)
    return build_model(name, **full)
