"""One registry: a sparsity config type -> the handler that applies it to each chosen layer.

``sparsify`` looks every section of a SparsityConfig up here, in the style of torchao's
``sparsify_``. A *weight* handler returns the parametrization registered on the layer's weight
(the mask changes in the parametrization's own step logic, never in the layer); a *module*
handler returns the module that replaces the layer (SDGP's layers share the dense one's
parameters). A new method is one new file (its config dataclass and its handler) plus one line
in ``HANDLERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.nn.utils import parametrize

from .config import GradSparsity, WeightBlock, WeightNM
from .layers import SUPPORTED, is_hf_conv1d, out_features
from .sdgp import SDGPConv2d, SDGPLinear
from .sdgp_conv1d import SDGPConv1D
from .sparse_cores import sparse_core_eligible, to_sparse_core
from .state import plain_layout
from .weight import BlockWeightSparsity, NMWeightSparsity


@dataclass(frozen=True)
class Handler:
    """prepare(cfg, name, module, index, tensor) checks that the layer can take the config (ValueError saying why,
    which sparsify prefixes with the layer) and returns apply(model), which converts it. sparsify calls
    every prepare before any apply, so a refused layer leaves the model untouched.

    for_grad: the section is chosen by the gradient filter (SDGP's layer rules) and applied first, since it
    replaces modules that weight parametrizations then register on by name.
    """

    prepare: Callable[..., Callable[[nn.Module], None]]  # (cfg, name, module, index, tensor="weight")
    for_grad: bool = False


def _weight(build: Callable):
    """A weight handler's prepare: one parametrization per layer, set up for the weight's layout (an (in, out)
    Conv1D weight is grouped along its input features, as a Linear's) and checked against its shape.

    With ``kernel="auto"`` (WeightNM) an eligible Linear first becomes a SparseCoreLinear, whose products
    run on 2:4 sparse tensor cores where the dispatcher measured them faster.
    """
    def prepare(cfg, name: str, mod: nn.Module, index: int, tensor: str = "weight"):
        p = build(cfg).orient(mod, tensor)
        p.check_weight(getattr(mod, tensor).shape, tensor)

        def apply(model: nn.Module) -> None:
            layer = model.get_submodule(name)  # by name: it may have just become its SDGP version
            if tensor == "weight" and getattr(cfg, "kernel", "dense") == "auto" and sparse_core_eligible(layer):
                layer = to_sparse_core(layer)
                if isinstance(layer, SDGPLinear):  # a new module: the SDGP step counter's layout again
                    plain_layout(layer)
                set_submodule(model, name, layer)
            parametrize.register_parametrization(layer, tensor, p)
            plain_layout(layer, tensor)
        return apply
    return prepare


def _nm_weight(cfg: WeightNM) -> NMWeightSparsity:
    return NMWeightSparsity(cfg.n, cfg.m, cfg.method, cfg.decay, cfg.transposable, cfg.mask_method,
                            cfg.recompute_every)


def _block_weight(cfg: WeightBlock) -> BlockWeightSparsity:
    return BlockWeightSparsity(cfg.block, cfg.sparsity, cfg.score, cfg.schedule, cfg.start_step, cfg.end_step,
                               cfg.every, cfg.power)


def _sdgp(cfg: GradSparsity, name: str, mod: nn.Module, index: int, tensor: str = "weight"):
    if isinstance(mod, nn.Conv2d):
        cls, out = SDGPConv2d, mod.out_channels
    elif isinstance(mod, nn.Linear):
        cls, out = SDGPLinear, mod.out_features
    elif is_hf_conv1d(mod):  # the product with W^T, as a Linear's
        cls, out = SDGPConv1D, out_features(mod)
    else:
        raise ValueError(f"SDGP swaps the layer for an SDGP version, which exists for {SUPPORTED}, not for "
                         f"{type(mod).__name__}; exclude it (weight sparsity may still apply)")
    if out % cfg.m:
        raise ValueError(f"SDGP groups the {out} output channels by m={cfg.m}, which does not divide them")

    def apply(model: nn.Module) -> None:
        # Each layer gets its own stream of random choices, reproducible from the config's seed.
        new = cls.from_dense(mod, n=cfg.n, m=cfg.m, method=cfg.method, seed=cfg.seed * 10007 + index)
        plain_layout(new)
        set_submodule(model, name, new)
    return apply


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called `name` (dotted) by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


HANDLERS: dict[type, Handler] = {
    WeightNM: Handler(_weight(_nm_weight)),
    WeightBlock: Handler(_weight(_block_weight)),
    GradSparsity: Handler(_sdgp, for_grad=True),
}


def handler_for(cfg) -> Handler:
    """The handler registered for the config's type (TypeError naming the known types otherwise)."""
    try:
        return HANDLERS[type(cfg)]
    except KeyError:
        known = ", ".join(t.__name__ for t in HANDLERS)
        raise TypeError(f"no sparsity handler for {type(cfg).__name__}; registered config types: {known}") from None
