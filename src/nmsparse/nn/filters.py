"""Which layers sparsify converts: the references' default, name patterns, and users' filter_fn.

``filter_fn(module, name) -> bool`` follows torchao's ``sparsify_``. The earlier order,
``filter_fn(name, module)``, still works for one release with a DeprecationWarning: it is
recognised from the function's signature (a first parameter called ``name``/``fqn`` or annotated
``str``), or else by trying it over the model's layers: where torchao's order raises or selects
nothing and the old order selects some, the old order is meant. Filters built here accept either order.
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from typing import Callable

import torch
from torch import nn

from .layers import is_linear_like, is_weight_layer, out_features

FilterFn = Callable[[nn.Module, str], bool]
_NAME_FIRST = {"name", "fqn", "layer_name", "module_name", "path", "qualname"}
_MODULE_FIRST = {"module", "mod", "layer", "m", "submodule"}


def _any_order(keep: Callable[[str, nn.Module], bool]) -> Callable:
    """A filter taking (module, name) or (name, module): the argument types tell which is which."""
    def f(a, b) -> bool:
        return keep(a, b) if isinstance(a, str) else keep(b, a)
    f.any_order = True
    return f


OUTPUT_NAMES = ("lm_head", "head", "classifier", "fc", "output", "out", "logits", "score")


def final_classifier(model: nn.Module) -> str | None:
    """Name of the last nn.Linear (or transformers Conv1D) in registration order (the fallback of ``output_layers``)."""
    last = None
    for name, mod in model.named_modules():
        if is_linear_like(mod):
            last = name
    return last


def output_layers(model: nn.Module, example_inputs=None) -> set[str]:
    """The Linear (or Conv1D) layer(s) that produce the model's output, which the references keep dense.

    With ``example_inputs`` (a tensor or a tuple of positional inputs): the last Linear called in
    one forward pass (eval mode, no gradients, modes restored). Without: a Linear whose weight is
    tied to an nn.Embedding's; else the one Linear whose outputs are an embedding's vocabulary; else
    the last Linear named like an output layer (lm_head, head, classifier, fc, output, ...); else
    the last Linear registered. Registration order alone misleads when the head is built first.
    """
    linears = [(n, m) for n, m in model.named_modules() if is_linear_like(m)]
    if not linears:
        return set()
    if example_inputs is not None:
        return {_last_called(model, linears, example_inputs)} - {None}
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    tied = {n for n, m in linears for e in embeddings if m.weight is e.weight}
    if tied:
        return tied
    named = [n for n, _ in linears if n.rsplit(".", 1)[-1] in OUTPUT_NAMES]
    vocab = {e.num_embeddings for e in embeddings}
    by_vocab = [n for n, m in linears if out_features(m) in vocab and out_features(m) > 1]
    if len(by_vocab) > 1:  # a hidden width may equal the vocabulary by chance: the names decide
        by_vocab = [n for n in by_vocab if n in named]
    if len(by_vocab) == 1:
        return set(by_vocab)
    return {named[-1] if named else linears[-1][0]}


@torch.no_grad()
def _last_called(model: nn.Module, linears, example_inputs) -> str | None:
    calls: list[str] = []
    hooks = [m.register_forward_hook(lambda *_a, n=n: calls.append(n)) for n, m in linears]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    return calls[-1] if calls else None


def default_filter(model: nn.Module, include_linear: bool = True, outputs: set[str] | None = None) -> FilterFn:
    """The references' choice: every Conv2d except a stem with <= 3 input channels, and (when
    include_linear) every Linear, transformers Conv1D and nn.MultiheadAttention except the output layer
    (``outputs``, by default ``output_layers(model)``). Embeddings are never chosen. Takes (module, name)
    or (name, module)."""
    heads = output_layers(model) if outputs is None else outputs

    def keep(name: str, mod: nn.Module) -> bool:
        if isinstance(mod, nn.Conv2d):
            return mod.in_channels > 3
        if is_linear_like(mod) or isinstance(mod, nn.MultiheadAttention):
            return include_linear and name not in heads
        return False

    return _any_order(keep)


def name_filter(patterns: list[str]) -> FilterFn:
    """Layers whose dotted name matches one of the fnmatch patterns."""
    return _any_order(lambda name, mod: any(fnmatch.fnmatchcase(name, p) for p in patterns))


def mha_projections(model: nn.Module) -> set[str]:
    """Linears owned by nn.MultiheadAttention: it reads their weight but never calls their forward."""
    out = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            out |= {f"{name}.{child}" if name else child for child, sub in mod.named_children()
                    if isinstance(sub, nn.Linear)}
    return out


def _declared_order(fn) -> str | None:
    """"name" or "module" when the signature says which argument comes first, else None."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    first = params[0]
    if first.annotation in (str, "str") or first.name in _NAME_FIRST:
        return "name"
    if first.name in _MODULE_FIRST or (isinstance(first.annotation, type) and issubclass(first.annotation, nn.Module)):
        return "module"
    return None


def _selects(fn, pairs) -> int | None:
    """How many (a, b) pairs fn accepts, or None when a call raises."""
    try:
        return sum(bool(fn(a, b)) for a, b in pairs)
    except (AttributeError, TypeError):
        return None


def _tried_order(fn, model: nn.Module) -> str:
    """Run fn over the model's Conv2d/Linear/Conv1D layers in both orders: the old order wins only where torchao's
    raises or selects nothing while the old one runs and selects something."""
    layers = [(n, m) for n, m in model.named_modules() if is_weight_layer(m)]
    new = _selects(fn, [(m, n) for n, m in layers])
    if new:
        return "module"
    old = _selects(fn, layers)
    return "name" if old else "module"


def as_name_module(fn, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The user's filter_fn as keep(name, module), warning once when it is written in the deprecated order."""
    if getattr(fn, "any_order", False):
        return fn
    order = _declared_order(fn) or _tried_order(fn, model)
    if order == "module":
        return lambda name, mod: fn(mod, name)
    warnings.warn("filter_fn(name, module) is deprecated: nmsparse now calls filter_fn(module, name), as torchao's "
                  "sparsify_ does; swap the arguments (the old order is recognised until the next release)",
                  DeprecationWarning, stacklevel=3)
    return fn
