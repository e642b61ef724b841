"""One-shot magnitude pruning to a pattern (N:M, transposable N:M-T, blocks), mean absorption, and the
pattern names the prune command takes.

Masks are computed on each layer's (out, in) view (``nn.layers.out_in_view``): a transformers Conv1D,
whose weight is stored (in, out), is pruned along its input features like an nn.Linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..nn.filters import as_name_module, default_filter
from ..kernels.transposable import transposable_mask  # the compiled exact solver on the CPU, else PyTorch
from ..nn.layers import is_weight_layer, layout_note, out_in_view, unknown_layer, unknown_weight_layers
from ..patterns import block_mask, conv_from_2d, conv_to_2d, nm_mask

FilterFn = Callable[[nn.Module, str], bool]  # torchao's order, as sparsify's
PATTERNS = ("2:4", "4:8", "4:8-T", "block8x8")
_NM = re.compile(r"^(\d+):(\d+)(-T)?$")
_BLOCK = re.compile(r"^block(\d+)x(\d+)$")


@dataclass(frozen=True)
class Pattern:
    kind: str  # "nm", "nmt" (transposable) or "block"
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (8, 8)
    sparsity: float = 0.5

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block{self.block[0]}x{self.block[1]} {self.sparsity:.0%}"
        return f"{self.n}:{self.m}" + ("-T" if self.kind == "nmt" else "")


def parse_pattern(pattern: str | Pattern, sparsity: float | None = None) -> Pattern:
    """'2:4', '4:8', '4:8-T' (any N:M or N:M-T with 0 < N < M) or 'block8x8' (any blockRxC, with
    ``sparsity``, the fraction of blocks zeroed: default 0.5). Case does not matter. An N:M pattern
    fixes its own sparsity (1 - N/M), so a sparsity other than None or 1 - N/M is an error."""
    if isinstance(pattern, Pattern):
        return pattern
    text = str(pattern).strip()
    mt, mb = _NM.match(text.upper()), _BLOCK.match(text.lower())
    if mt:
        n, m = int(mt.group(1)), int(mt.group(2))
        if 0 < n < m:
            if sparsity is not None and abs(float(sparsity) - (1 - n / m)) > 1e-9:
                raise ValueError(f"sparsity {sparsity} does not apply to pattern {text}: an N:M pattern keeps N of "
                                 f"every M ({1 - n / m:.0%} zeros); sparsity is for block patterns (blockRxC)")
            return Pattern("nmt" if mt.group(3) else "nm", n, m)
    elif mb and int(mb.group(1)) > 0 and int(mb.group(2)) > 0:
        sparsity = 0.5 if sparsity is None else sparsity
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (the fraction of blocks zeroed), got {sparsity}")
        return Pattern("block", block=(int(mb.group(1)), int(mb.group(2))), sparsity=float(sparsity))
    raise ValueError(f"unknown pattern {pattern!r}: valid patterns are {', '.join(PATTERNS)} "
                     "(or any N:M, N:M-T with 0 < N < M, blockRxC)")


def _check_layer(name: str, mod: nn.Module, p: Pattern) -> None:
    w = out_in_view(mod)
    if p.kind == "nm":
        sizes, what = [(1, w.shape[1])], "input channels"
        divisor = (p.m,)
    elif p.kind == "nmt":
        w2 = conv_to_2d(w) if w.dim() == 4 else w
        sizes, what = [(0, w2.shape[0]), (1, w2.shape[1])], "2-D (out, kh*kw*in) view"
        divisor = (p.m, p.m)
    else:
        sizes, what = [(0, w.shape[0]), (1, w.shape[1])], "output/input channels"
        divisor = p.block
    for (d, size), div in zip(sizes, divisor):
        if size % div:
            raise ValueError(f"layer {name!r} (weight {tuple(w.shape)} as (out, in){layout_note(mod)}) cannot take "
                             f"pattern {p}: "
                             f"{what} dim {d} has size {size}, not divisible by {div}; "
                             "exclude it with filter_fn or choose another pattern")


def weight_mask(w: torch.Tensor, pattern: str | Pattern, sparsity: float | None = None) -> torch.Tensor:
    """Bool magnitude mask of a Linear (out, in) or Conv2d (Co, Ci, kh, kw) weight for the pattern."""
    p = parse_pattern(pattern, sparsity)
    w = w.detach()
    if p.kind == "nm":
        return nm_mask(w, p.n, p.m, dim=1)
    if p.kind == "nmt":
        if w.dim() == 4:
            return conv_from_2d(transposable_mask(conv_to_2d(w), p.n, p.m), w.shape).contiguous()
        return transposable_mask(w, p.n, p.m)
    return block_mask(w, p.block, p.sparsity)


def layer_mask(mod: nn.Module, pattern: str | Pattern, sparsity: float | None = None) -> torch.Tensor:
    """``weight_mask`` of a layer's weight, computed on its (out, in) view and returned in the weight's own
    layout (transposed back for a Conv1D)."""
    return out_in_view(mod, weight_mask(out_in_view(mod), pattern, sparsity))


def _groups(t: torch.Tensor, p: Pattern) -> torch.Tensor:
    """(G, m) view of the N:M groups: m consecutive input channels (N:M), or m consecutive entries along
    the input axis of the (out, kh*kw*in) view, i.e. one row of one m x m tile (N:M-T). A copy."""
    if p.kind == "nmt":
        t2 = conv_to_2d(t) if t.dim() == 4 else t
        return t2.reshape(-1, p.m)
    return t.movedim(1, -1).reshape(-1, p.m)


def _ungroup(g: torch.Tensor, like: torch.Tensor, p: Pattern) -> torch.Tensor:
    if p.kind == "nmt":
        if like.dim() == 4:
            return conv_from_2d(g.reshape(like.shape[0], -1), like.shape)
        return g.reshape(like.shape)
    moved = like.movedim(1, -1)
    return g.reshape(moved.shape).movedim(-1, 1)


@torch.no_grad()
def absorb_mean_(w: torch.Tensor, mask: torch.Tensor, pattern: str | Pattern) -> torch.Tensor:
    """Mean absorption, in place on w, which is returned masked.

    For each N:M group g (see ``_groups``) with kept set K (|K| = n) and pruned set P (|P| = m - n):
    w[k] += sum(w[P]) / |K| for every k in K, then w[P] = 0. The group's sum is preserved exactly;
    at 50% (n = m - n, the 2:4, 4:8 and 4:8-T cases) the added value is the mean of the pruned weights.
    A group with no kept entry (possible only for inexact masks) just loses its pruned weights.
    Blocks: no absorption (the pruned weights are in other rows/columns), w is only masked.
    """
    p = parse_pattern(pattern)
    if p.kind == "block":
        return w.mul_(mask)
    g, k = _groups(w, p), _groups(mask, p).to(w.dtype)
    pruned_sum = (g * (1 - k)).sum(-1, keepdim=True)
    kept = k.sum(-1, keepdim=True)
    g = (g + pruned_sum / kept.clamp(min=1)) * k
    w.copy_(_ungroup(g, w, p))
    return w


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> list[tuple[str, nn.Module]]:
    """Conv2d / Linear / Conv1D layers the filter selects (default: convs with in_channels > 3, Linears and
    Conv1Ds but the classifier). A filter_fn that selects a layer whose weight layout nmsparse does not know is
    an error naming it."""
    keep = as_name_module(filter_fn, model) if filter_fn is not None else default_filter(model)
    if filter_fn is not None:
        for name, mod in unknown_weight_layers(model):
            if keep(name, mod):
                raise ValueError(unknown_layer(name, mod))
    return [(n, m) for n, m in model.named_modules() if is_weight_layer(m) and keep(n, m)]


def check_pattern_fits(layers, p: Pattern) -> None:
    for name, mod in layers:
        _check_layer(name, mod, p)


@torch.no_grad()
def magnitude_prune(model: nn.Module, pattern: str | Pattern, filter_fn: FilterFn | None = None,
                    sparsity: float | None = None) -> nn.Module:
    """Baseline: zero the weights of every selected layer by the magnitude mask, in place (no reconstruction)."""
    p = parse_pattern(pattern, sparsity)
    layers = prunable_layers(model, filter_fn)
    check_pattern_fits(layers, p)
    for _, mod in layers:
        view = out_in_view(mod)  # a view: the product lands in the layer's weight
        view.mul_(weight_mask(view, p))
    return model


def prune_blocks(model: nn.Module, sparsity: float, block=(8, 8), dense_first: bool = True) -> list[str]:
    """Zero the lowest-L2 ``sparsity`` of the blocks of every Conv2d/Linear/Conv1D whose channels the block divides
    (all but the first conv when dense_first, as in the paper), in place. Returns the pruned layer names."""
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise ValueError(f"prune sparsity must be in [0, 1), got {sparsity!r}")
    pruned, first = [], True
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not is_weight_layer(mod):
                continue
            if isinstance(mod, nn.Conv2d) and first:
                first = False
                if dense_first:
                    continue
            w = out_in_view(mod)
            if getattr(mod, "groups", 1) != 1 or w.shape[0] % block[0] or w.shape[1] % block[1]:
                continue
            w.mul_(block_mask(w, block, sparsity))
            pruned.append(name)
    return pruned
