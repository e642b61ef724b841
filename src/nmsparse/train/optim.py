"""Optimizers with the references' weight-decay rule: norm parameters and biases are not decayed."""

from __future__ import annotations

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Two groups: decayed weights, and norm parameters plus biases (decay 0 unless asked)."""
    no_decay_ids = set()
    if not decay_norm_and_bias:
        for mod in model.modules():
            if isinstance(mod, NORM_TYPES):
                no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                no_decay_ids.add(id(p))
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0 if not decay_norm_and_bias else weight_decay}]


FUSED_DEVICES = ("cpu", "cuda")


def fused_supported(params) -> bool:
    """Whether torch's fused AdamW takes every parameter: floating point, on a CPU or CUDA device.

    The default (for-each) AdamW takes the square root of every exp_avg_sq each step, and on the CPU
    that square root (MKL's vector math) is 5-9x slower on zeros, which a frozen mask's pruned
    weights keep for the whole run (docs/benchmarks.md); the fused kernel is faster dense or sparse.
    """
    return all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        fused = True if cfg.fused and fused_supported(model.parameters()) else None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {cfg.name!r}")


def keep_fused_choice(opt: torch.optim.Optimizer, chosen: list) -> bool:
    """After ``opt.load_state_dict``: each group's ``fused`` back to what build_optimizer chose for this run (`chosen`,
    one per group), with its step counters where that implementation wants them. A checkpoint's groups carry the
    writing run's setting: none before optim.fused existed, or fused=True resumed where fused is not supported.
    Returns whether any group changed."""
    changed = False
    for group, fused in zip(opt.param_groups, chosen):
        if group.get("fused") == fused:
            continue
        changed, group["fused"] = True, fused
        for p in group["params"]:
            state = opt.state.get(p, {})
            if torch.is_tensor(state.get("step")):  # fused / capturable: on the parameter's device; else the CPU
                device = p.device if fused or group.get("capturable") else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
    return changed
