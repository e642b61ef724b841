"""Running a compiled model on the CPU: block-sparse modules, timing, and the per-layer fallback.

``BlockSparseConv2d`` / ``BlockSparseLinear`` hold a weight as kept 8x8 blocks
(kernels.block_cpu.BlockSparseMatrix) and run it with the block-sparse CPU kernel. They are for
inference: float32 CPU inputs without autograd run sparse; anything else (other dtypes, devices,
inputs that need gradients) runs ``F.conv2d`` / ``F.linear`` on the dense weight rebuilt from the
blocks, so results never depend on the path beyond float32 rounding.

``decide`` times a layer's dense module against its block-sparse one on an input of the layer's
shape (alternating runs, median of each) and keeps the sparse kernel only when it is faster:
the per-layer fallback the plan reports.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.block_cpu import BlockSparseMatrix, block_sparse_conv2d, block_sparse_linear, resolve_backend
from .layers import LayerSpec

__all__ = ["BlockSparseConv2d", "BlockSparseLinear", "to_block_sparse", "alternating_timer", "decide",
           "layer_input", "build_executable", "supports_sparse"]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _BlockSparseBase(nn.Module):
    def _use_sparse(self, x: torch.Tensor) -> bool:
        return (x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and x.requires_grad))

    def _dense_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.mat.to_dense().view(self.weight_shape)
        return self._dense.to(device=x.device, dtype=x.dtype)


class BlockSparseConv2d(_BlockSparseBase):
    """Inference Conv2d (groups=1, zero padding) on kept 8x8 blocks."""

    def __init__(self, conv: nn.Conv2d, backend: str = "auto"):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"BlockSparseConv2d takes groups=1 convs with numeric zero padding, got {conv}")
        w = conv.weight.detach().to("cpu", torch.float32)
        self.weight_shape = tuple(w.shape)
        self.mat = BlockSparseMatrix.from_weight(w)
        self.kernel_size = _pair(conv.kernel_size)
        self.stride, self.padding, self.dilation = _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to("cpu", torch.float32).clone())
        self.backend = backend
        self._dense = None

    def forward(self, x):
        if self._use_sparse(x):
            return block_sparse_conv2d(x, self.mat, self.kernel_size, self.bias, self.stride, self.padding,
                                       self.dilation, backend=self.backend)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.conv2d(x, self._dense_weight(x), b, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.weight_shape[1]}, {self.weight_shape[0]}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, blocks kept={self.mat.density:.3f}, backend={self.backend}")


class BlockSparseLinear(_BlockSparseBase):
    """Inference Linear on kept 8x8 blocks."""

    def __init__(self, linear: nn.Linear, backend: str = "auto"):
        super().__init__()
        w = linear.weight.detach().to("cpu", torch.float32)
        self.weight_shape = tuple(w.shape)
        self.mat = BlockSparseMatrix.from_weight(w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32).clone())
        self.backend = backend
        self._dense = None

    def forward(self, x):
        if self._use_sparse(x):
            return block_sparse_linear(x, self.mat, self.bias, backend=self.backend)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, self._dense_weight(x), b)

    def extra_repr(self) -> str:
        return (f"in_features={self.weight_shape[1]}, out_features={self.weight_shape[0]}, "
                f"blocks kept={self.mat.density:.3f}, backend={self.backend}")


def supports_sparse(mod: nn.Module) -> bool:
    """True for a Linear, or a groups=1 zero-padded Conv2d with numeric padding, whose channels divide by 8."""
    if isinstance(mod, nn.Linear):
        return mod.out_features % 8 == 0 and mod.in_features % 8 == 0
    if isinstance(mod, nn.Conv2d):
        return (mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
                and mod.out_channels % 8 == 0 and mod.in_channels % 8 == 0)
    return False


def to_block_sparse(mod: nn.Module, backend: str = "auto") -> nn.Module:
    if isinstance(mod, nn.Linear):
        return BlockSparseLinear(mod, backend)
    if isinstance(mod, nn.Conv2d):
        return BlockSparseConv2d(mod, backend)
    raise TypeError(f"to_block_sparse takes nn.Conv2d or nn.Linear, got {type(mod).__name__}")


def layer_input(spec: LayerSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random float32 input with the shape the layer saw in the example forward."""
    if spec.kind == "linear":
        return torch.randn(spec.w_in, spec.ci, generator=generator)
    return torch.randn(spec.batch, spec.ci, spec.h_in, spec.w_in, generator=generator)


def alternating_timer(fns: Sequence[Callable], repeats: int = 7, warmup: int = 1,
                      budget_s: float = 2.0, samples: bool = False) -> list:
    """Median seconds of each fn, timed in alternating rounds (so load changes hit all alike).

    At least 3 rounds (fewer if ``repeats`` < 3); stops after ``repeats`` rounds or once ``budget_s``
    is spent. With ``samples=True`` returns every round's times per fn instead of the medians.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times if samples else [statistics.median(t) for t in times]


@torch.no_grad()
def decide(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, timer=None) -> dict:
    """Time dense vs block-sparse on x; {"dense_s", "sparse_s", "decision"} with the faster kept."""
    timer = timer or alternating_timer
    td, ts = timer([lambda: dense(x), lambda: sparse(x)])
    return {"dense_s": float(td), "sparse_s": float(ts), "decision": "sparse" if ts < td else "dense"}


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def build_executable(model: nn.Module, sparse_layers: Sequence[str], backend: str = "auto") -> nn.Module:
    """A copy of the (plain, dense-with-zeros) model with the named layers made block-sparse, in eval mode."""
    resolve_backend(backend)
    out = copy.deepcopy(model).to("cpu").eval()
    for name in sparse_layers:
        _set(out, name, to_block_sparse(out.get_submodule(name), backend))
    return out
