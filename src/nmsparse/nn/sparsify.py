"""`sparsify(model, config, filter_fn)`: convert a model in place; report, squash and track masks."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..patterns.diversity import SAD, sad
from .config import SparsityConfig
from .filters import (FilterFn, as_name_module, default_filter, final_classifier, mha_projections, name_filter,
                      output_layers)
from .layers import SUPPORTED, is_weight_layer, layout_note, unknown_layer, unknown_weight_layers
from .registry import handler_for, set_submodule
from .sdgp_conv1d import SDGP_LAYERS
from .sparse_cores import SparseCoreLinear
from .state import parametrized_tensors, remove_plain_layout
from .weight import find_parametrization

__all__ = ["sparsify", "sparsity_report", "format_report", "squash", "weight_masks", "SADTracker", "sparse_layers",
           "default_filter", "final_classifier"]

def _mha_tensors(mod: nn.MultiheadAttention) -> list[str]:
    """The q, k, v projection weights nn.MultiheadAttention multiplies by (its reduction dim is dim 1, as a Linear's)."""
    return ["in_proj_weight"] if mod._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def _plan(model: nn.Module, config: SparsityConfig, keep, for_grad: bool, outputs: set[str]):
    """(name, module, tensor) of the layers one config section converts, in registration order."""
    explicit = keep is not None or config.include is not None
    if keep is not None:
        chosen = keep
    elif config.include is not None:
        chosen = name_filter(config.include)
    else:
        chosen = default_filter(model, include_linear=not for_grad or config.grad.layers == "conv+linear",
                                outputs=outputs)
    excluded = name_filter(config.exclude)
    mha = mha_projections(model) if for_grad else set()
    unknown = {n for n, _ in unknown_weight_layers(model)} if explicit else set()
    plan = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention) and not for_grad and chosen(name, mod) and not excluded(name, mod):
            plan += [(name, mod, tensor) for tensor in _mha_tensors(mod)]
            continue
        if name in unknown and chosen(name, mod) and not excluded(name, mod):
            _refuse_unknown(name, mod, config)
            continue
        if not is_weight_layer(mod) or not chosen(name, mod) or excluded(name, mod):
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
        plan.append((name, mod, "weight"))
    return plan


def _refuse_unknown(name: str, mod: nn.Module, config: SparsityConfig) -> None:
    """A selected layer whose weight layout nmsparse does not know: an error, or a warning under skip."""
    msg = unknown_layer(name, mod)
    if config.on_incompatible != "skip":
        raise ValueError(msg + " (pass on_incompatible='skip' to leave such layers dense)")
    warnings.warn(f"nmsparse.sparsify: skipping {msg}", stacklevel=4)


def _prepared(name: str, mod: nn.Module, tensor: str, prepare, config: SparsityConfig):
    """prepare() (the handler's check and set-up), or None with a warning when skipping is allowed."""
    try:
        return prepare()
    except ValueError as e:
        what = _qualified(name, tensor)
        shape = tuple(getattr(mod, tensor).shape)
        msg = f"layer {what!r} ({type(mod).__name__} {shape}{layout_note(mod, tensor)}): {e}"
        if config.on_incompatible == "skip":
            warnings.warn(f"nmsparse.sparsify: skipping {msg}", stacklevel=3)
            return None
        raise ValueError(msg + " (pass on_incompatible='skip' to leave such layers dense)") from None


def _nothing_selected(model: nn.Module, config: SparsityConfig, filter_fn, what: str, for_grad: bool) -> ValueError:
    layers = [n for n, m in model.named_modules() if is_weight_layer(m)]
    if filter_fn is not None:
        how = "filter_fn (called as filter_fn(module, name), torchao's order)"
    elif config.include is not None:
        how = f"include={config.include}"
    else:
        linears = not for_grad or config.grad.layers == "conv+linear"
        how = "the default filter (convs with > 3 input channels" + (", Linears/Conv1Ds but the last)" if linears else
                                                                     "; GradSparsity(layers='conv+linear') adds Linears)")
    shown = (", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")) if layers else "none"
    unknown = unknown_weight_layers(model)
    others = "" if not unknown else (
        "; layers whose weight layout nmsparse does not know, so never selected: "
        + ", ".join(f"{n} ({type(m).__name__})" for n, m in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        + f" (nmsparse sparsifies {SUPPORTED} layers)")
    if for_grad and filter_fn is None and config.include is None and config.grad.layers == "conv" and \
            any(isinstance(m, nn.Linear) for m in model.modules()):
        others += "; for the Linear layers (a transformer, an MLP) set grad.layers: conv+linear"
    return ValueError(f"no layer selected for {what} sparsity: {how} with exclude={config.exclude} matched none of "
                      f"the model's Conv2d/Linear/Conv1D layers ({shown}){others}")


def sparsify(model: nn.Module, config: SparsityConfig | dict, filter_fn: FilterFn | None = None, *,
             example_inputs=None) -> nn.Module:
    """Convert `model` in place to the weight and/or data-gradient sparsity in `config`; returns it.

    filter_fn(module, name) -> bool picks the layers, as in torchao's ``sparsify_`` (default: the
    references' choice, see `default_filter`; the older filter_fn(name, module) still works, with a
    DeprecationWarning); config.include / config.exclude select by module-name patterns instead.
    Each config section is applied by its handler in ``nn.registry.HANDLERS``. Every selected layer
    is checked before any is converted, so an error leaves the model as it was; selecting no layer
    at all is an error, and so is a selection that on_incompatible="skip" empties. The default filter
    keeps the model's output layer dense, found from the model itself (``filters.output_layers``;
    pass ``example_inputs`` to find it by a forward pass). nn.MultiheadAttention's q, k, v projection
    weights take weight sparsity like any Linear's, and so do Hugging Face transformers' Conv1D layers
    (GPT-2; weight stored (in, out), grouped along its input features, dim 0). A selected layer of a
    type whose weight layout nmsparse does not know is an error naming it (``nn.layers``). Call it
    before building the optimizer (parameters keep their identity), then ``attach(model, optimizer)``: masks
    then step once per optimizer step (``nn.mask_step``). The state dict keeps the plain layout (``nn.state``): a
    plain model loads it.
    """
    if isinstance(config, dict):
        config = SparsityConfig.from_dict(config)
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig or a dict, got {type(config).__name__}")
    for name, mod in model.named_modules():
        if any(find_parametrization(mod, t) for t in parametrized_tensors(mod)) or isinstance(mod, SDGP_LAYERS):
            raise ValueError(f"layer {name!r} is already sparsified; call squash(model) first to start over")
    keep = as_name_module(filter_fn, model) if filter_fn is not None else None
    outputs = output_layers(model, example_inputs) if keep is None and config.include is None else set()
    sections = [(s, handler_for(s)) for s in (config.grad, config.weight) if s is not None]
    applies = []
    for section, handler in sorted(sections, key=lambda sh: not sh[1].for_grad):  # module swaps first
        planned = _plan(model, config, keep, handler.for_grad, outputs)
        what = "gradient (SDGP)" if handler.for_grad else "weight"
        if not planned:
            raise _nothing_selected(model, config, filter_fn, what, for_grad=handler.for_grad)
        skipped = []
        for index, (name, mod, tensor) in enumerate(planned):
            apply = _prepared(name, mod, tensor, lambda: handler.prepare(section, name, mod, index, tensor), config)
            if apply is None:
                skipped.append(_qualified(name, tensor))
            else:
                applies.append(apply)
        if len(skipped) == len(planned):
            raise ValueError(f"no layer can take the {what} sparsity: every selected layer was skipped as incompatible "
                             f"({', '.join(skipped[:8])}{', ...' if len(skipped) > 8 else ''}); choose an N:M or "
                             f"block that divides their channels, or select other layers")
    for apply in applies:
        apply(model)
    return model


def sparse_layers(model: nn.Module):
    """(name, module, weight parametrization or None, is_sdgp) for every converted layer. A parametrized
    tensor other than ``weight`` (nn.MultiheadAttention's in_proj_weight) is listed as ``<layer>.<tensor>``."""
    for name, mod in model.named_modules():
        is_sdgp = isinstance(mod, SDGP_LAYERS)
        found = False
        for tensor in parametrized_tensors(mod):
            p = find_parametrization(mod, tensor)
            if p is not None:
                found = True
                yield _qualified(name, tensor), mod, p, is_sdgp and tensor == "weight"
        if is_sdgp and not found:
            yield name, mod, None, True


def _qualified(name: str, tensor: str) -> str:
    """A layer's name, or "<layer>.<tensor>" for a tensor other than its weight."""
    return name if tensor == "weight" else ".".join(filter(None, (name, tensor)))


def _tensor(mod: nn.Module, p) -> str:
    """The name of the tensor parametrization p sits on ("weight" for SDGP-only layers)."""
    for tensor in parametrized_tensors(mod):
        if p is not None and p in list(mod.parametrizations[tensor]):
            return tensor
    return "weight"


@torch.no_grad()  # reading a parametrized weight with grad on would count as a training step
def sparsity_report(model: nn.Module) -> list[dict]:
    """Per converted layer: weight pattern, weight density, gradient pattern, parameter counts."""
    rows = []
    for name, mod, p, is_sdgp in sparse_layers(model):
        w = getattr(mod, _tensor(mod, p)).detach()
        rows.append({
            "layer": name,
            "type": type(mod).__name__.removeprefix("FSDP").removeprefix("Parametrized"),  # FSDP2 and parametrize subclass
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
    """Back to plain nn.Conv2d / nn.Linear / transformers Conv1D (and plain nn.MultiheadAttention) with the masked
    weights baked in (dense with zeros), in place."""
    for name, mod in list(model.named_modules()):
        tensors = [t for t in parametrized_tensors(mod) if find_parametrization(mod, t) is not None]
        if tensors:
            # torch removes the weight property from the module's injected class, which a deepcopy of
            # the model shares: give this module a class of its own first, so the copy keeps working.
            cls = mod.__class__
            mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for tensor in tensors:
                parametrize.remove_parametrizations(mod, tensor, leave_parametrized=True)
        remove_plain_layout(mod)
        if isinstance(mod, SDGP_LAYERS + (SparseCoreLinear,)):
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
