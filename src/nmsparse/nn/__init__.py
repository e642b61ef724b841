"""Autograd functions, parametrizations and modules for sparse training, and `sparsify`."""

from .config import GradSparsity, SparsityConfig, WeightBlock, WeightNM
from .export import to_semi_structured
from .mask_step import attach, step_masks
from .sdgp import SDGPConv2d, SDGPLinear, prune_grad
from .sdgp_conv1d import SDGPConv1D
from .sparse_cores import SparseCoreLinear
from .sparsify import (SADTracker, default_filter, format_report, sparsify, sparsity_report, squash,
                       weight_masks)
from .weight import BlockWeightSparsity, NMWeightSparsity

__all__ = [
    "SparsityConfig", "WeightNM", "WeightBlock", "GradSparsity",
    "prune_grad", "SDGPConv2d", "SDGPLinear", "SDGPConv1D", "SparseCoreLinear", "NMWeightSparsity",
    "BlockWeightSparsity",
    "sparsify", "attach", "step_masks", "default_filter", "sparsity_report", "format_report", "squash",
    "weight_masks", "SADTracker", "to_semi_structured",
]
