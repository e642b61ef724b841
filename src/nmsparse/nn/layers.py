"""The layers nmsparse sparsifies and how their weights are laid out: the one place that says which dims are (out, in).

``nn.Linear`` stores its weight (out, in) and ``nn.Conv2d`` (out, in, kh, kw): N:M groups run
along dim 1, the reduction dim. Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2,
GPT-J's ancestors, ...) computes ``y = x @ W + b`` with W stored (in, out): its groups run along
dim 0. It is recognised by its class name and module path, so transformers is never imported
here (it stays an optional extra, ``nmsparse[hf]``). A layer class of one's own whose weight is
stored (in, out) can say so with a class attribute ``nmsparse_weight_in_out = True``.

Every part that picks layers or builds masks (the weight parametrizations, sparsify's plan, the
one-shot pruning, the report) asks ``weight_dims`` / ``out_in_view`` and computes on the
(out, in) view, so a mask on the view is the mask an nn.Linear holding W^T would get.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED = "nn.Linear, nn.Conv2d or transformers' Conv1D (GPT-2)"
MHA_TENSORS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether module is (a subclass of) transformers' Conv1D, found without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.split(".")[0] == "transformers" for c in type(module).__mro__)


def weight_in_out(module: nn.Module, tensor: str = "weight") -> bool:
    """Whether module.<tensor> is stored (in, out), transposed from nn.Linear's (out, in)."""
    return tensor == "weight" and (is_hf_conv1d(module) or bool(getattr(type(module), "nmsparse_weight_in_out", False)))


def is_weight_layer(module: nn.Module) -> bool:
    """A layer whose weight nmsparse can orient: nn.Linear, nn.Conv2d, Conv1D (or a declared (in, out) layer)."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or weight_in_out(module)


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear or a Conv1D: a 2-D weight applied to the last dim of its input."""
    return isinstance(module, nn.Linear) or weight_in_out(module)


def weight_dims(module: nn.Module, tensor: str = "weight") -> tuple[int, int] | None:
    """(out dim, in dim) of module.<tensor>: (0, 1) for nn.Linear, nn.Conv2d and nn.MultiheadAttention's
    projections, (1, 0) for Conv1D; None for a layer whose layout nmsparse does not know."""
    if weight_in_out(module, tensor):
        return (1, 0)
    if isinstance(module, (nn.Linear, nn.Conv2d)) and tensor == "weight":
        return (0, 1)
    if isinstance(module, nn.MultiheadAttention) and tensor in MHA_TENSORS:
        return (0, 1)
    return None


def out_in_view(module: nn.Module, t: torch.Tensor | None = None, tensor: str = "weight") -> torch.Tensor:
    """t (default: module.<tensor>) seen as (out, in[, kh, kw]): a transposed view for Conv1D (in-place
    writes reach the layer's weight), t itself otherwise. Applying it twice gives t back."""
    t = getattr(module, tensor) if t is None else t
    return t.t() if weight_in_out(module, tensor) else t


def out_features(module: nn.Module) -> int:
    """The number of outputs of a linear-like layer."""
    return module.weight.shape[weight_dims(module)[0]]


def layout_note(module: nn.Module, tensor: str = "weight") -> str:
    """For messages: a note on an (in, out) weight's layout (which dim N:M groups run along), else ""."""
    return f" (stored (in, out) by {type(module).__name__}; groups run along its dim 0)" \
        if weight_in_out(module, tensor) else ""


def unknown_layer(name: str, module: nn.Module) -> str:
    """Why a selected layer cannot be sparsified: its type, and which layers can."""
    w = getattr(module, "weight", None)
    shape = f" with a weight of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else ""
    cls = type(module)
    return (f"layer {name!r} is a {cls.__module__}.{cls.__qualname__}{shape}, whose weight layout nmsparse does not "
            f"know (which dim is the output and which the input, which N:M groups run along); nmsparse sparsifies "
            f"{SUPPORTED} layers: exclude this one, replace it by one of those, or, if it computes x @ W with W "
            f"stored (in, out), give its class the attribute nmsparse_weight_in_out = True")


def unknown_weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers with a 2-D or larger ``weight`` Parameter that nmsparse cannot orient (embeddings excluded:
    they are lookups, never sparsified); for messages about a model it does not know."""
    out = []
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")  # not getattr: a parametrized weight would be recomputed
        if w is None and "parametrizations" in mod._modules and hasattr(mod.parametrizations, "weight"):
            w = mod.parametrizations.weight.original
        if w is None or w.dim() < 2 or is_weight_layer(mod) or isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            continue
        out.append((name, mod))
    return out
