"""Reference models (plain torch.nn) and `build_model(name, **kwargs)` over the `MODELS` registry."""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

from torch import nn

from .models_resnet import ResNet, ResNet9, RegNet, regnetx_400mf, resnet18, resnet50
from .models_vit import ViT, vit_tiny

__all__ = ["MLP", "MODELS", "RegNet", "ResNet", "ResNet9", "SmallCNN", "ViT", "build_model",
           "regnetx_400mf", "resnet18", "resnet50", "vit_tiny"]


class SmallCNN(nn.Module):
    """Digits (8x8) / MNIST (28x28) CNN: conv in->w, conv w->2w /2, conv 2w->4w /2, avg-pool, Linear.

    With the default width 32 every conv after the (dense) stem has channel counts that are multiples
    of 32, so 2:4, 4:8, 8:16, 16:32, 8x8 blocks and transposable 4:8 all apply.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        layers, cin = [], in_channels
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class MLP(nn.Module):
    """Flatten, then Linear + ReLU per hidden width (keep them multiples of 32), then a Linear classifier."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10):
        super().__init__()
        layers, cin = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU(inplace=True)]
            cin = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet9": ResNet9,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "regnetx_400mf": regnetx_400mf,
    "small_cnn": SmallCNN,
    "mlp": MLP,
    "vit_tiny": vit_tiny,
    "vit": ViT,
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
