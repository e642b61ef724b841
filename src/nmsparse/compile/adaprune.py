"""AdaPrune (Hubara et al., 2021; SPEC section 4): a trained dense model to N:M / 4:8-T / blocks with little data.

Per layer, in forward order:

1. cache the layer's input, taken from the *current* model (layers upstream already pruned and
   reconstructed), and the layer's output in a frozen copy of the *dense* model (the target).
   This is the sequential variant: each layer also learns to undo the error of the layers before it;
2. mask its weight by magnitude for the pattern;
3. optionally absorb the pruned weights into the kept ones (``absorb_mean``; see ``absorb_mean_``);
4. minimise MSE(layer(x), y_dense) with Adam (lr_w for the weight, lr_b for the bias) for ``iters``
   steps over random mini-batches of ``batch`` cached samples (all of them when there are fewer),
   re-applying the mask after every step.

Finally batch-norm running statistics are recomputed on ``bn_recalib_x`` (cumulative average,
one forward in train mode without gradients).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.sparsify import default_filter
from ..patterns import block_mask, conv_from_2d, conv_to_2d, nm_mask, transposable_mask

FilterFn = Callable[[str, nn.Module], bool]
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


def check_settings(iters, batch, prefix: str = "") -> None:
    """ValueError unless iters is an int >= 0 and batch an int >= 1 (prefix: "--" for CLI flags)."""
    for key, value, low, what in (("iters", iters, 0, "Adam steps per layer"),
                                  ("batch", batch, 1, "cached samples per Adam step")):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{prefix}{key} ({what}) must be an int >= {low}, got {value!r}")


def _check_layer(name: str, mod: nn.Module, p: Pattern) -> None:
    w = mod.weight
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
            raise ValueError(f"layer {name!r} (weight {tuple(w.shape)}) cannot take pattern {p}: "
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
    """Conv2d / Linear layers the filter selects (default: convs with in_channels > 3, Linears but the classifier)."""
    keep = filter_fn or default_filter(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and keep(n, m)]


@torch.no_grad()
def _forward_order(model: nn.Module, layers, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The layers sorted by the order of their first call in a forward pass on x (uncalled ones last)."""
    order: dict[str, int] = {}

    def seen(name):
        def hook(*_a):  # returns None: the layer's output is left alone
            order.setdefault(name, len(order))
        return hook

    hooks = [mod.register_forward_hook(seen(name)) for name, mod in layers]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return sorted(layers, key=lambda nm: order.get(nm[0], len(layers) + 1))


@torch.no_grad()
def _capture(model: nn.Module, mod: nn.Module, x: torch.Tensor, chunk: int, want: str) -> torch.Tensor:
    """The input (want='in') or output (want='out') of mod over every call in model(x), concatenated."""
    got: list[torch.Tensor] = []

    def hook(_m, inp, out):
        got.append((inp[0] if want == "in" else out).detach().clone())

    h = mod.register_forward_hook(hook)
    try:
        for s in range(0, len(x), chunk):
            model(x[s:s + chunk])
    finally:
        h.remove()
    return torch.cat(got)


def _check_pattern_fits(layers, p: Pattern) -> None:
    for name, mod in layers:
        _check_layer(name, mod, p)


@torch.no_grad()
def magnitude_prune(model: nn.Module, pattern: str | Pattern, filter_fn: FilterFn | None = None,
                    sparsity: float | None = None) -> nn.Module:
    """Baseline: zero the weights of every selected layer by the magnitude mask, in place (no reconstruction)."""
    p = parse_pattern(pattern, sparsity)
    layers = prunable_layers(model, filter_fn)
    _check_pattern_fits(layers, p)
    for _, mod in layers:
        mod.weight.mul_(weight_mask(mod.weight, p))
    return model


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Reset every batch norm's running stats and recompute them as the exact statistics of one
    forward pass on x (momentum=None: cumulative average over a single batch). Other modules
    (dropout, ...) stay in eval mode; the model's modes and momenta are restored afterwards."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        model(x)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, t in modes.items():
            m.train(t)
    return model


def adaprune(model: nn.Module, calib_x: torch.Tensor, pattern: str | Pattern, *, sparsity: float | None = None,
             iters: int = 1000, batch: int = 50, lr_w: float = 1e-3, lr_b: float = 1e-2,
             absorb_mean: bool = True, filter_fn: FilterFn | None = None,
             bn_recalib_x: torch.Tensor | None = None, progress: bool = False, seed: int = 0,
             chunk: int = 256, report: list | None = None) -> nn.Module:
    """Prune the selected layers of model to pattern in place and reconstruct them on calib_x (see module doc).

    report, when a list, receives one dict per layer: name, mse_magnitude (masked, before
    absorption), mse_init (after absorption), mse_final (after reconstruction), on all cached samples.
    """
    p = parse_pattern(pattern, sparsity)
    layers = prunable_layers(model, filter_fn)
    _check_pattern_fits(layers, p)
    if calib_x is None or len(calib_x) == 0:
        raise ValueError("adaprune needs at least one calibration sample")
    check_settings(iters, batch)
    was_training = model.training
    model.eval()
    dense = copy.deepcopy(model).eval()
    dense_mods = dict(dense.named_modules())
    layers = _forward_order(model, layers, calib_x[:1])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    it = layers
    if progress:
        from tqdm import tqdm
        it = tqdm(layers, desc="adaprune")
    for name, mod in it:
        x = _capture(model, mod, calib_x, chunk, "in")
        y = _capture(dense, dense_mods[name], calib_x, chunk, "out")
        w = mod.weight
        with torch.no_grad():
            mask = weight_mask(w, p)
            dense_w = w.detach().clone()
            w.mul_(mask)
            mse_mag = F.mse_loss(mod(x), y).item()
            if absorb_mean:
                w.copy_(dense_w)
                absorb_mean_(w, mask, p)
            del dense_w
            mse_init = F.mse_loss(mod(x), y).item()
        groups = [{"params": [w], "lr": lr_w}]
        if getattr(mod, "bias", None) is not None:
            groups.append({"params": [mod.bias], "lr": lr_b})
        opt = torch.optim.Adam(groups)
        fmask = mask.to(w.dtype)
        with torch.enable_grad():
            for _ in range(iters):
                if len(x) <= batch:
                    xb, yb = x, y
                else:
                    idx = torch.randperm(len(x), generator=gen)[:batch].to(x.device)
                    xb, yb = x[idx], y[idx]
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(mod(xb), yb)
                loss.backward()
                w.grad.mul_(fmask)
                opt.step()
                with torch.no_grad():
                    w.mul_(fmask)
        with torch.no_grad():
            mse_final = F.mse_loss(mod(x), y).item()
        if report is not None:
            report.append({"name": name, "mse_magnitude": mse_mag, "mse_init": mse_init, "mse_final": mse_final})
        del x, y
    del dense
    if bn_recalib_x is not None:
        recalibrate_bn(model, bn_recalib_x)
    model.train(was_training)
    return model
