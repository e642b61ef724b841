"""Mask updates once per optimizer step: ``attach(model, optimizer)`` and ``step_masks(model)``.

In the style of torch.ao.pruning's ``sparsifier.step()``: the forward applies the current masks and the
step logic (count the step, recompute a mask that is due from the weights the optimizer just wrote) runs
after each optimizer step. What a step is, and what happens without this: nn/weight.py's module docstring.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .masked import warn_counted_forwards
from .sdgp_conv1d import SDGP_LAYERS
from .state import parametrized_tensors
from .weight import find_parametrization

__all__ = ["attach", "step_masks", "MaskStepHandle"]


def _weight_layers(model: nn.Module):
    """(name, dense weight Parameter, parametrization) of every weight sparsity parametrization in `model`."""
    for name, mod in model.named_modules():
        for tensor in parametrized_tensors(mod):
            p = find_parametrization(mod, tensor)
            if p is not None:
                yield (name if tensor == "weight" else f"{name}.{tensor}".lstrip(".")), \
                    getattr(mod.parametrizations, tensor).original, p


def _advance(layers) -> None:
    counted = {}
    for name, original, p in layers:
        n = p.advance(original)
        if n > 1:
            counted[name or "<model>"] = n
    warn_counted_forwards(counted)


def step_masks(model: nn.Module) -> None:
    """One optimizer step for every weight sparsity layer of `model`: call it right after ``optimizer.step()``.

    Counts the step and recomputes each mask that is due at the new count from the weights the optimizer just
    wrote. ``attach(model, optimizer)`` does this for you; call ``attach(model)`` once before training when you
    call step_masks yourself, so that forwards never count (see nn/weight.py). Layers that an optimizer hook
    steps already (``attach(model, optimizer)``) are an error: they would count twice.
    """
    layers = list(_weight_layers(model))
    hooked = [name for name, _, p in layers if p.attached]
    if hooked:
        raise ValueError(f"step_masks: layers {', '.join(hooked[:4])}{', ...' if len(hooked) > 4 else ''} already "
                         f"step after each step of the optimizer they are attached to (nmsparse.attach); calling "
                         f"step_masks too would count every step twice (remove the attach handle first)")
    _advance(layers)


class MaskStepHandle:
    """What ``attach(model, optimizer)`` returns: ``remove()`` takes its optimizer hook off; the layers keep counting
    optimizer steps, now by ``step_masks(model)`` calls."""

    def __init__(self, hook_handle, layers):
        self._hook, self._layers = hook_handle, layers

    def remove(self) -> None:
        self._hook.remove()
        for _, _, p in self._layers:
            p.attached_to = None


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MaskStepHandle | None:
    """Make the weight sparsity layers of `model` count optimizer steps instead of training forwards.

    With `optimizer`, registers a step post-hook (``optimizer.register_step_post_hook``) that steps, after every
    ``optimizer.step()``, the layers whose dense weight that optimizer updates (a layer it does not hold keeps
    counting training forwards); returns a handle whose ``remove()`` takes the hook off. Without, the caller
    calls ``step_masks(model)`` after every optimizer step. Call it after ``sparsify`` and after the weights are
    final (pretrained ones loaded), before training: an update the state still holds pending is applied from
    the weights of this moment. Loading a state dict afterwards is fine (its pending update, if any, waits for
    the next training forward). With gradient accumulation, activation checkpointing or torch.compile this is
    what keeps the schedules (transposable ``recompute_every``, gradual blocks) on the configured steps.
    A model with SDGP layers only has nothing to attach (SDGP counts each forward's own draw): None.
    """
    layers = list(_weight_layers(model))
    if not layers:
        if any(isinstance(m, SDGP_LAYERS) for m in model.modules()):
            return None
        raise ValueError("attach: the model has no weight sparsity layer; call nmsparse.sparsify(model, config) "
                         "first")
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(q) for group in optimizer.param_groups for q in group["params"]}
        layers = [layer for layer in layers if id(layer[1]) in held]
        if not layers:
            raise ValueError("attach: the optimizer holds none of the model's sparsified weights (build it from "
                             "model.parameters() after sparsify, or pass the optimizer that trains them)")
        again = [name for name, _, p in layers if p.attached]
        if again:
            raise ValueError(f"attach: layers {', '.join(again[:4])}{', ...' if len(again) > 4 else ''} are attached "
                             f"to an optimizer already; each optimizer step would count twice (remove() the "
                             f"handle attach returned first)")
    for _, original, p in layers:
        p.count_optimizer_steps(original)
    if optimizer is None:
        return None
    for _, _, p in layers:
        p.attached_to = weakref.ref(optimizer)

    def hook(opt, args, kwargs):
        # A fused optimizer under a GradScaler is stepped even when the scaler found inf / NaN (the kernel then
        # skips the update itself, reading opt.found_inf): such a step does not count, as with any other optimizer.
        found_inf = getattr(opt, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        _advance(layers)

    return MaskStepHandle(optimizer.register_step_post_hook(hook), layers)

