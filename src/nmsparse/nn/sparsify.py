"""`sparsify(model, config, filter_fn)`: convert a model in place; report, squash and track masks."""

from __future__ import annotations

import fnmatch
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..patterns.diversity import SAD, sad
from .config import GradSparsity, SparsityConfig, WeightBlock, WeightNM
from .sdgp import SDGPConv2d, SDGPLinear
from .sparse_cores import SparseCoreLinear, sparse_core_eligible, to_sparse_core
from .weight import BlockWeightSparsity, NMWeightSparsity

FilterFn = Callable[[str, nn.Module], bool]


def final_classifier(model: nn.Module) -> str | None:
    """Name of the last nn.Linear in registration order (the classifier the references keep dense)."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    return last


def default_filter(model: nn.Module, include_linear: bool = True) -> FilterFn:
    """The references' choice: every Conv2d except a stem with <= 3 input channels, and (when
    include_linear) every Linear except the final classifier (the last nn.Linear registered: pass
    a filter_fn or config.include where that is not the classifier)."""
    head = final_classifier(model)

    def keep(name: str, mod: nn.Module) -> bool:
        if isinstance(mod, nn.Conv2d):
            return mod.in_channels > 3
        if isinstance(mod, nn.Linear):
            return include_linear and name != head
        return False

    return keep


def _mha_projections(model: nn.Module) -> set[str]:
    """Linears owned by nn.MultiheadAttention: it reads their weight but never calls their forward."""
    out = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            out |= {f"{name}.{child}" if name else child for child, sub in mod.named_children()
                    if isinstance(sub, nn.Linear)}
    return out


def _name_filter(patterns: list[str]) -> FilterFn:
    return lambda name, mod: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _weight_parametrization(cfg: WeightNM | WeightBlock):
    if isinstance(cfg, WeightNM):
        return NMWeightSparsity(cfg.n, cfg.m, cfg.method, cfg.decay, cfg.transposable,
                                cfg.mask_method, cfg.recompute_every)
    return BlockWeightSparsity(cfg.block, cfg.sparsity, cfg.score, cfg.schedule, cfg.start_step,
                               cfg.end_step, cfg.every, cfg.power)


def _to_sdgp(name: str, mod: nn.Module, cfg: GradSparsity, index: int) -> nn.Module:
    cls = SDGPConv2d if isinstance(mod, nn.Conv2d) else SDGPLinear
    # Each layer gets its own stream of random choices, reproducible from the config's seed.
    return cls.from_dense(mod, n=cfg.n, m=cfg.m, method=cfg.method, seed=cfg.seed * 10007 + index)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _plan(model: nn.Module, config: SparsityConfig, filter_fn: FilterFn | None, for_grad: bool):
    explicit = filter_fn is not None or config.include is not None
    if filter_fn is not None:
        chosen = filter_fn
    elif config.include is not None:
        chosen = _name_filter(config.include)
    else:
        chosen = default_filter(model, include_linear=not for_grad or config.grad.layers == "conv+linear")
    excluded = _name_filter(config.exclude)
    mha = _mha_projections(model) if for_grad else set()
    plan = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or not chosen(name, mod) or excluded(name, mod):
            continue
        if name in mha:  # SDGP replaces forward(), which nn.MultiheadAttention never calls
            if explicit:
                raise ValueError(f"layer {name!r} belongs to an nn.MultiheadAttention, which uses its weight without "
                                 f"calling its forward, so SDGP cannot prune its gradient; exclude it (weight "
                                 f"sparsity does work there) or build attention from nn.Linear layers")
            continue
        if not for_grad and not explicit and isinstance(mod, nn.Conv2d) and mod.groups > 1 \
                and mod.groups == mod.in_channels:
            continue  # depthwise: one input channel per filter leaves nothing to group or block
        plan.append((name, mod))
    return plan


def _compatible(name: str, mod: nn.Module, check, config: SparsityConfig) -> bool:
    try:
        check()
        return True
    except ValueError as e:
        msg = f"layer {name!r} ({type(mod).__name__} {tuple(mod.weight.shape)}): {e}"
        if config.on_incompatible == "skip":
            warnings.warn(f"nmsparse.sparsify: skipping {msg}", stacklevel=3)
            return False
        raise ValueError(msg + " (pass on_incompatible='skip' to leave such layers dense)") from None


def _nothing_selected(model: nn.Module, config: SparsityConfig, filter_fn, what: str, for_grad: bool) -> ValueError:
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if filter_fn is not None:
        how = "filter_fn"
    elif config.include is not None:
        how = f"include={config.include}"
    else:
        linears = not for_grad or config.grad.layers == "conv+linear"
        how = "the default filter (convs with > 3 input channels" + (", Linears but the last)" if linears else ")")
    shown = (", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")) if layers else "none"
    return ValueError(f"no layer selected for {what} sparsity: {how} with exclude={config.exclude} matched none of "
                      f"the model's Conv2d/Linear layers ({shown})")


def sparsify(model: nn.Module, config: SparsityConfig | dict, filter_fn: FilterFn | None = None) -> nn.Module:
    """Convert `model` in place to the weight and/or data-gradient sparsity in `config`; returns it.

    filter_fn(name, module) -> bool picks the layers (default: the references' choice, see
    `default_filter`); config.include / config.exclude select by module-name patterns instead.
    Every selected layer is checked before any is converted, so an error leaves the model as it
    was; selecting no layer at all is an error. Call it before building the optimizer: parameters
    keep their identity, but a weight parametrization moves the dense weight to
    `<layer>.parametrizations.weight.original`.
    """
    if isinstance(config, dict):
        config = SparsityConfig.from_dict(config)
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig or a dict, got {type(config).__name__}")
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight") or isinstance(mod, (SDGPConv2d, SDGPLinear)):
            raise ValueError(f"layer {name!r} is already sparsified; call squash(model) first to start over")
    grad_plan, weight_plan = [], []
    if config.grad is not None:
        planned = _plan(model, config, filter_fn, for_grad=True)
        if not planned:
            raise _nothing_selected(model, config, filter_fn, "gradient (SDGP)", for_grad=True)
        for index, (name, mod) in enumerate(planned):
            out = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
            if _compatible(name, mod, lambda: _check_channels(out, config.grad.m), config):
                grad_plan.append((name, mod, index))
    if config.weight is not None:
        planned = _plan(model, config, filter_fn, for_grad=False)
        if not planned:
            raise _nothing_selected(model, config, filter_fn, "weight", for_grad=False)
        for name, mod in planned:
            p = _weight_parametrization(config.weight)
            if _compatible(name, mod, lambda: p.check_weight(mod.weight.shape), config):
                weight_plan.append((name, p))
    for name, mod, index in grad_plan:
        _set_submodule(model, name, _to_sdgp(name, mod, config.grad, index))
    for name, p in weight_plan:  # by name: the module may have just become its SDGP version
        if getattr(config.weight, "kernel", "dense") == "auto" and sparse_core_eligible(model.get_submodule(name)):
            _set_submodule(model, name, to_sparse_core(model.get_submodule(name)))
        parametrize.register_parametrization(model.get_submodule(name), "weight", p)
    return model


def _check_channels(out: int, m: int) -> None:
    if out % m:
        raise ValueError(f"SDGP groups the {out} output channels by m={m}, which does not divide them")


def sparse_layers(model: nn.Module):
    """(name, module, weight parametrization or None, is_sdgp) for every converted layer."""
    for name, mod in model.named_modules():
        p = None
        if parametrize.is_parametrized(mod, "weight"):
            p = next((q for q in mod.parametrizations.weight
                      if isinstance(q, (NMWeightSparsity, BlockWeightSparsity))), None)
        is_sdgp = isinstance(mod, (SDGPConv2d, SDGPLinear))
        if p is not None or is_sdgp:
            yield name, mod, p, is_sdgp


@torch.no_grad()  # reading a parametrized weight with grad on would count as a training step
def sparsity_report(model: nn.Module) -> list[dict]:
    """Per converted layer: weight pattern, weight density, gradient pattern, parameter counts."""
    rows = []
    for name, mod, p, is_sdgp in sparse_layers(model):
        w = mod.weight.detach()
        rows.append({
            "layer": name,
            "type": type(mod).__name__.removeprefix("Parametrized"),
            "shape": tuple(w.shape),
            "weight": p.pattern_name() if p is not None else "dense",
            "density": float((w != 0).float().mean()),
            "grad": f"SDGP {mod.n}:{mod.m} {mod.method}" if is_sdgp else "dense",
            "params": w.numel(),
            "nonzero": int((w != 0).sum()),
        })
    return rows


def format_report(rows: list[dict]) -> str:
    """The report as a Markdown table, with a total line."""
    head = ["layer", "type", "shape", "weight", "density", "grad", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['type']} | {'x'.join(map(str, r['shape']))} | {r['weight']} | "
                     f"{r['density']:.3f} | {r['grad']} | {r['params']} |")
    total, nz = sum(r["params"] for r in rows), sum(r["nonzero"] for r in rows)
    lines.append(f"| total | | | | {nz / max(total, 1):.3f} | | {total} |")
    return "\n".join(lines)


@torch.no_grad()
def squash(model: nn.Module) -> nn.Module:
    """Back to plain nn.Conv2d / nn.Linear with the masked weights baked in (dense with zeros), in place."""
    for name, mod, p, is_sdgp in list(sparse_layers(model)):
        if p is not None:
            # torch removes the weight property from the module's injected class, which a deepcopy of
            # the model shares: give this module a class of its own first, so the copy keeps working.
            cls = mod.__class__
            mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        if is_sdgp or isinstance(mod, SparseCoreLinear):
            _set_submodule(model, name, mod.to_dense())
    return model


def weight_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every weight mask, by layer name: a snapshot for SAD tracking."""
    return {name: p.mask.detach().clone() for name, _, p, _ in sparse_layers(model) if p is not None}


class SADTracker:
    """Sparse architecture divergence (mask flips) of a model since a reference point of training."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.reference = weight_masks(model)

    def sad(self) -> SAD:
        return sad(self.reference, weight_masks(self.model))

    def reset(self) -> None:
        self.reference = weight_masks(self.model)
