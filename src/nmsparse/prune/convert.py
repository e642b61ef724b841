"""One call from a trained dense model to a pattern that stays through fine-tuning (apex ASP's prune_trained_model).

``prune_trained_model(model, "2:4")`` zeroes the weights by magnitude (or, given calibration inputs,
by AdaPrune), then sparsifies the same layers with a frozen mask (``WeightNM(method="fixed")`` or a
one-shot ``WeightBlock``), so every later optimizer step keeps the pattern: the gradient of a
pruned weight is masked and the layers compute with W * mask. Parameters keep their identity, so
an optimizer built before the call keeps working.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import SparsityConfig, WeightBlock, WeightNM, sparsify
from .adaprune import adaprune
from .magnitude import FilterFn, Pattern, magnitude_prune, parse_pattern

__all__ = ["prune_trained_model", "frozen_config"]


def frozen_config(pattern: str | Pattern, sparsity: float | None = None) -> SparsityConfig:
    """The sparsify config that freezes a pruned model's pattern: fixed N:M (transposable for N:M-T) or blocks."""
    p = parse_pattern(pattern, sparsity)
    if p.kind == "block":
        return SparsityConfig(weight=WeightBlock(p.block, p.sparsity))
    return SparsityConfig(weight=WeightNM(p.n, p.m, method="fixed", transposable=p.kind == "nmt"))


def prune_trained_model(model: nn.Module, pattern: str | Pattern = "2:4", optimizer: torch.optim.Optimizer | None = None,
                        *, calib_x: torch.Tensor | None = None, sparsity: float | None = None,
                        filter_fn: FilterFn | None = None, **adaprune_kwargs) -> nn.Module:
    """Prune `model` in place to `pattern` ("2:4", "4:8", "4:8-T", "block8x8", ...) and freeze that pattern.

    Without ``calib_x`` the weights are zeroed by magnitude; with it, AdaPrune reconstructs each
    layer from those inputs (``adaprune_kwargs`` go to ``nmsparse.prune.adaprune``). ``optimizer``,
    when given, is checked to hold the model's parameters (they keep their identity); momentum
    and Adam statistics of the pruned entries stay, and no longer matter. Returns the model.
    """
    p = parse_pattern(pattern, sparsity)
    if optimizer is not None:
        held = {id(q) for group in optimizer.param_groups for q in group["params"]}
        missing = [n for n, q in model.named_parameters() if q.requires_grad and id(q) not in held]
        if missing:
            raise ValueError(f"optimizer does not hold the model's parameters {missing[:5]}: pass the optimizer "
                             f"built for this model, or build it after prune_trained_model")
    if calib_x is not None:
        adaprune(model, calib_x, p, filter_fn=filter_fn, **adaprune_kwargs)
    else:
        if adaprune_kwargs:
            raise TypeError(f"{sorted(adaprune_kwargs)} are AdaPrune settings: pass calib_x to use AdaPrune")
        magnitude_prune(model, p, filter_fn=filter_fn)
    return sparsify(model, frozen_config(p), filter_fn=filter_fn)
