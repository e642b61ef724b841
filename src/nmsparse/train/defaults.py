"""The embedded default run: a small CNN on scikit-learn's digits, dense and SDGP rescale 2:4."""

from __future__ import annotations

import copy

DIGITS_DENSE = {
    "name": "digits dense",
    "seed": 0,
    "epochs": 12,
    "data": {"name": "digits", "batch_size": 64, "translate": 1},
    "model": {"name": "small_cnn", "kwargs": {"width": 32}},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
              "label_smoothing": 0.1},
    "schedule": {"name": "onecycle"},
}


def default_configs() -> list[dict]:
    """The two runs `nmsparse train` makes without --config."""
    sdgp = copy.deepcopy(DIGITS_DENSE)
    sdgp["name"] = "digits SDGP rescale 2:4"
    sdgp["sparsity"] = {"grad": {"n": 2, "m": 4, "method": "rescale"}}
    return [copy.deepcopy(DIGITS_DENSE), sdgp]
