"""Inference export: a model's 2:4 Linear weights as PyTorch semi-structured sparse tensors on 2:4 sparse tensor cores.

``to_semi_structured(model)`` is the GPU counterpart of the block-sparse CPU runtime
(``nmsparse compile --target cpu`` / ``nmsparse.compile.load_executable``): it squashes the model,
then turns every nn.Linear whose weight is 2:4 along its input features into a frozen
``torch.sparse.SparseSemiStructuredTensor`` Parameter (cuSPARSELt or CUTLASS), so ``F.linear`` runs
on the sparse cores. CUDA sm80+ and float16/bfloat16 weights only; anywhere else it raises
``SemiStructuredUnavailable`` saying why, before touching the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import semi_structured as ss
from ..patterns import is_nm
from .filters import FilterFn, as_name_module
from .sparsify import squash

__all__ = ["to_semi_structured", "semi_structured_candidates"]

# The smallest weight the CUTLASS and cuSPARSELt kernels take (rows, cols); both multiples of these.
MIN_SHAPE = (32, 64)


def semi_structured_candidates(model: nn.Module, filter_fn: FilterFn | None = None) -> list[str]:
    """Names of the nn.Linear layers whose weight is exactly 2:4 along dim 1 and of a shape the kernels take."""
    keep = as_name_module(filter_fn, model) if filter_fn is not None else (lambda name, mod: True)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not keep(name, mod):  # sparsified Linears are Linears too
            continue
        rows, cols = mod.weight.shape
        if rows % MIN_SHAPE[0] or cols % MIN_SHAPE[1]:
            continue
        with torch.no_grad():
            if is_nm(mod.weight, 2, 4, dim=1, exact=False):
                out.append(name)
    return out


def placement_error(name: str, w: torch.Tensor) -> str | None:
    """Why layer `name`'s weight cannot go to the sparse cores as it is placed, or None."""
    if w.device.type != "cuda" or w.dtype not in ss.SPARSE_DTYPES:
        return (f"layer {name!r}: weight is {w.dtype} on {w.device}; 2:4 sparse tensor cores take float16 or "
                f"bfloat16 CUDA weights: call model.half().cuda() (or .to(torch.bfloat16)) first")
    return None


@torch.no_grad()
def to_semi_structured(model: nn.Module, filter_fn: FilterFn | None = None, backend: str = "auto") -> list[str]:
    """Squash `model` in place and put its 2:4 Linear weights on 2:4 sparse tensor cores; returns their names.

    For inference: the converted weights are frozen (requires_grad=False). The model must already be
    on a CUDA device (sm80+) in float16 or bfloat16. Layers whose weight is not 2:4, or whose shape
    is not a multiple of (32, 64), stay dense. ``filter_fn(module, name)`` narrows the choice.
    """
    ok, why = ss.availability()
    if not ok:
        raise ss.SemiStructuredUnavailable(
            f"to_semi_structured: {why}. On a CPU, compile the model for the block-sparse CPU runtime instead "
            f"(nmsparse compile --target cpu, then nmsparse.compile.load_executable)")
    names = semi_structured_candidates(model, filter_fn)
    for name in names:
        problem = placement_error(name, model.get_submodule(name).weight)
        if problem:
            raise ValueError(problem)
    squash(model)
    for name in names:
        mod = model.get_submodule(name)
        mod.weight = nn.Parameter(ss.to_sparse_24(mod.weight.detach(), backend), requires_grad=False)
    return names
