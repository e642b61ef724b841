"""`sparsify(model, config, filter_fn)`: convert a model in place; report, squash and track masks."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..patterns.diversity import SAD, sad
from .config import SparsityConfig
from .filters import FilterFn, as_name_module, default_filter, final_classifier, mha_projections, name_filter
from .registry import handler_for, set_submodule
from .sdgp import SDGPConv2d, SDGPLinear
from .sparse_cores import SparseCoreLinear
from .weight import BlockWeightSparsity, NMWeightSparsity

__all__ = ["sparsify", "sparsity_report", "format_report", "squash", "weight_masks", "SADTracker", "sparse_layers",
           "default_filter", "final_classifier"]

def _plan(model: nn.Module, config: SparsityConfig, keep, for_grad: bool):
    """(name, module) of the layers one config section converts, in registration order."""
    explicit = keep is not None or config.include is not None
    if keep is not None:
        chosen = keep
    elif config.include is not None:
        chosen = name_filter(config.include)
    else:
        chosen = default_filter(model, include_linear=not for_grad or config.grad.layers == "conv+linear")
    excluded = name_filter(config.exclude)
    mha = mha_projections(model) if for_grad else set()
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


def _prepared(name: str, mod: nn.Module, prepare, config: SparsityConfig):
    """prepare() (the handler's check and set-up), or None with a warning when skipping is allowed."""
    try:
        return prepare()
    except ValueError as e:
        msg = f"layer {name!r} ({type(mod).__name__} {tuple(mod.weight.shape)}): {e}"
        if config.on_incompatible == "skip":
            warnings.warn(f"nmsparse.sparsify: skipping {msg}", stacklevel=3)
            return None
        raise ValueError(msg + " (pass on_incompatible='skip' to leave such layers dense)") from None


def _nothing_selected(model: nn.Module, config: SparsityConfig, filter_fn, what: str, for_grad: bool) -> ValueError:
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if filter_fn is not None:
        how = "filter_fn (called as filter_fn(module, name), torchao's order)"
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

    filter_fn(module, name) -> bool picks the layers, as in torchao's ``sparsify_`` (default: the
    references' choice, see `default_filter`; the older filter_fn(name, module) still works, with a
    DeprecationWarning); config.include / config.exclude select by module-name patterns instead.
    Each config section is applied by its handler in ``nn.registry.HANDLERS``. Every selected layer
    is checked before any is converted, so an error leaves the model as it was; selecting no layer
    at all is an error. Call it before building the optimizer: parameters keep their identity, but a
    weight parametrization moves the dense weight to `<layer>.parametrizations.weight.original`.
    """
    if isinstance(config, dict):
        config = SparsityConfig.from_dict(config)
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig or a dict, got {type(config).__name__}")
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight") or isinstance(mod, (SDGPConv2d, SDGPLinear)):
            raise ValueError(f"layer {name!r} is already sparsified; call squash(model) first to start over")
    keep = as_name_module(filter_fn, model) if filter_fn is not None else None
    sections = [(s, handler_for(s)) for s in (config.grad, config.weight) if s is not None]
    applies = []
    for section, handler in sorted(sections, key=lambda sh: not sh[1].for_grad):  # module swaps first
        planned = _plan(model, config, keep, handler.for_grad)
        if not planned:
            what = "gradient (SDGP)" if handler.for_grad else "weight"
            raise _nothing_selected(model, config, filter_fn, what, for_grad=handler.for_grad)
        for index, (name, mod) in enumerate(planned):
            apply = _prepared(name, mod, lambda: handler.prepare(section, name, mod, index), config)
            if apply is not None:
                applies.append(apply)
    for apply in applies:
        apply(model)
    return model


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
            set_submodule(model, name, mod.to_dense())
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
