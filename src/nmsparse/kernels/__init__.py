"""Execution backends: Triton N:M pruning, 2:4 sparse tensor cores, block-sparse CPU kernels.

Importing this package imports neither triton nor the kernels (they load on first use, and
triton decides at its import whether to compile or interpret). Layering: kernels/ uses
patterns/ and formats/ only; nn/ may use kernels/.

- ``reference``: torch implementations (SDGP pruning, Triton's random stream, SR-STE masking,
  the transposable 4x4-tile 2:4 pattern of PyTorch's tile op) that run on any device;
- ``triton_prune``: the Triton kernels (``prune`` along any channel dim, ``srste_mask_apply``);
- ``semi_structured``: PyTorch's 2:4 semi-structured sparsity (compression, the fused tile op,
  sparse products, ``Linear24``);
- ``dispatch``: ``use_triton`` and the measuring ``Dispatcher``;
- ``block_cpu``: block-sparse Linear/Conv on the CPU for compiled models (a native kernel built
  on first use from ``csrc/block_sparse.cpp`` by ``_extensions``, PyTorch BSR as the fallback),
  imported by compile/ only;
- ``transposable``: the compiled exact transposable N:M solver (``csrc/transposable.cpp``, built on
  first use) and ``transposable_mask``, which runs it for exact masks with m >= 4 on the CPU and
  ``patterns.transposable_mask`` otherwise (nn/, prune/ and ``nmsparse.transposable_mask`` call it);
- ``compiled_masking``: W * mask and SR-STE's backward as opaque ops for graphs that torch.compile
  traces on the CPU (the C++ pass instead of inductor's scalar loop over a bool mask);
- ``ops``: what nn/ calls (``prune_grad_fast``, ``tile24_prune_grad``,
  ``sdgp_linear_dx``, ``weight24_linear``, ``weight24_linear_dx``).
"""

from . import dispatch, ops, reference, semi_structured, transposable, triton_prune
from .dispatch import Decision, Dispatcher, default_dispatcher, triton_status, use_triton
from .ops import prune_grad_fast, sdgp_linear_dx, tile24_prune_grad, weight24_linear, weight24_linear_dx
from .reference import prune_random_reference, prune_reference, srste_reference, tile24_mask, tile24_reference
from .semi_structured import SemiStructuredUnavailable
from .triton_prune import SUPPORTED_M, prune, srste_mask_apply

__all__ = [
    "dispatch", "ops", "reference", "semi_structured", "transposable", "triton_prune",
    "Decision", "Dispatcher", "default_dispatcher", "triton_status", "use_triton",
    "prune_grad_fast", "sdgp_linear_dx", "tile24_prune_grad", "weight24_linear",
    "weight24_linear_dx",
    "prune_reference", "prune_random_reference", "srste_reference", "tile24_mask", "tile24_reference",
    "SemiStructuredUnavailable", "SUPPORTED_M", "prune", "srste_mask_apply",
]
