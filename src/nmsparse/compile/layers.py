"""The compiler's view of a model: one LayerSpec per Conv2d/Linear call, and each weight's format.

``extract_layers`` runs the model once on zeros of the example input shape with forward hooks,
recording for every Conv2d and Linear call its shapes (input and output sizes, kernel, stride,
padding, dilation, groups). A Linear on an input (..., in) is T = prod(...) positions of a 1x1
conv: batch 1, height 1, width T.

``detect_format`` reads a plain (dense-with-zeros) weight and decides how it is stored:

* ``block``: some bo x bi blocks (over all kernel positions) are entirely zero; kept blocks and
  CSR block indices are stored (formats.BlockCompressed);
* ``nm``: every group of m consecutive input channels holds at most n nonzeros for one of the
  patterns in ``NM_PATTERNS`` (formats.NMCompressed along dim 1), and there are no zero blocks;
* ``dense`` otherwise.

A layer is "sparse" when it is block or N:M. Channels not divisible by the block, on a layer whose
weights are at least ``SPARSE_LOOKING`` zeros and not N:M, is an error (``IncompatibleLayer``)
unless ``on_incompatible="dense"``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

__all__ = ["LayerSpec", "LayerFormat", "extract_layers", "detect_format", "NM_PATTERNS",
           "IncompatibleLayer", "NoSparseLayers", "SPARSE_LOOKING"]

# Tried in this order; the first that holds wins (fewest kept per group first, then smaller m).
NM_PATTERNS = ((1, 4), (2, 8), (2, 4), (4, 8), (8, 16), (16, 32))
SPARSE_LOOKING = 0.25  # fraction of exactly-zero weights above which a layer "looks sparse"


class IncompatibleLayer(ValueError):
    """A layer whose zeros cannot be stored in the requested block format."""


class NoSparseLayers(ValueError):
    """A model in which no Conv2d/Linear layer has block or N:M sparse weights."""


@dataclass
class LayerSpec:
    """One Conv2d or Linear call: sizes the cost models need (a Linear is a 1x1 conv, H=1, W=T)."""

    name: str
    kind: str  # "conv" or "linear"
    co: int
    ci: int
    kh: int = 1
    kw: int = 1
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    batch: int = 1
    h_in: int = 1
    w_in: int = 1
    h_out: int = 1
    w_out: int = 1
    bias: bool = False
    notes: list = field(default_factory=list)

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates of one call."""
        return self.batch * self.h_out * self.w_out * self.co * (self.ci // self.groups) * self.kh * self.kw

    @property
    def weight_shape(self) -> tuple:
        if self.kind == "linear":
            return (self.co, self.ci)
        return (self.co, self.ci // self.groups, self.kh, self.kw)

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def in_numel(self) -> int:
        return self.batch * self.ci * self.h_in * self.w_in

    @property
    def out_numel(self) -> int:
        return self.batch * self.co * self.h_out * self.w_out

    def describe(self) -> str:
        if self.kind == "linear":
            return f"Linear {self.ci}->{self.co} x{self.w_out}"
        s = f"Conv {self.ci}->{self.co} {self.kh}x{self.kw}"
        if self.stride != (1, 1):
            s += f"/{self.stride[0]}" if self.stride[0] == self.stride[1] else f"/{self.stride}"
        if self.groups != 1:
            s += f" g{self.groups}"
        return s + f" @{self.h_in}x{self.w_in}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stride"], d["padding"], d["dilation"] = list(self.stride), list(self.padding), list(self.dilation)
        return d

    @classmethod
    def conv(cls, name, ci, co, k, hw, stride=1, padding=None, batch=1, dilation=1, groups=1, bias=False):
        """A conv spec from sizes alone (k, hw, stride, padding: int or pair; default padding k//2)."""
        kh, kw = (k, k) if isinstance(k, int) else k
        h, w = (hw, hw) if isinstance(hw, int) else hw
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
        if padding is None:
            padding = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return cls(name, "conv", co, ci, kh, kw, (sh, sw), (ph, pw), (dh, dw), groups, batch, h, w, ho, wo, bias)

    @classmethod
    def linear(cls, name, ci, co, tokens=1, bias=True):
        return cls(name, "linear", co, ci, batch=1, h_in=1, w_in=tokens, h_out=1, w_out=tokens, bias=bias)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _spec_of(name: str, mod: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerSpec:
    if isinstance(mod, nn.Linear):
        tokens = x.numel() // mod.in_features
        return LayerSpec.linear(name, mod.in_features, mod.out_features, tokens, bias=mod.bias is not None)
    b, _, h, w = x.shape
    ho, wo = y.shape[-2:]
    kh, kw = _pair(mod.kernel_size)
    sh, sw = _pair(mod.stride)
    dh, dw = _pair(mod.dilation)
    notes = []
    if isinstance(mod.padding, str):
        # "same"/"valid": the total padding that produced this output size, split as PyTorch does.
        tot_h = max((ho - 1) * sh + dh * (kh - 1) + 1 - h, 0)
        tot_w = max((wo - 1) * sw + dw * (kw - 1) + 1 - w, 0)
        ph, pw = tot_h // 2, tot_w // 2
        if tot_h % 2 or tot_w % 2:
            notes.append(f"padding={mod.padding!r} is asymmetric here")
    else:
        ph, pw = _pair(mod.padding)
    if mod.padding_mode != "zeros":
        notes.append(f"padding_mode={mod.padding_mode!r}")
    return LayerSpec(name, "conv", mod.out_channels, mod.in_channels, kh, kw, (sh, sw), (ph, pw), (dh, dw),
                     mod.groups, b, h, w, int(ho), int(wo), mod.bias is not None, notes)


@torch.no_grad()
def extract_layers(model: nn.Module, input_shape) -> list[tuple[LayerSpec, nn.Module]]:
    """(spec, module) of every Conv2d / Linear call of ``model(zeros(input_shape))``, in call order.

    A module called more than once (weight sharing) is recorded at its first call, with a note.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"example input shape must be positive sizes such as (1, 3, 224, 224), got {input_shape!r}")
    names = {mod: name for name, mod in model.named_modules()}
    found: list[tuple[LayerSpec, nn.Module]] = []
    seen: dict[nn.Module, LayerSpec] = {}

    def hook(mod, args, out):
        if mod in seen:
            if "called more than once; planned for its first call" not in seen[mod].notes:
                seen[mod].notes.append("called more than once; planned for its first call")
            return
        spec = _spec_of(names.get(mod, "?"), mod, args[0], out)
        seen[mod] = spec
        found.append((spec, mod))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        try:
            model(torch.zeros(shape, device=device, dtype=dtype))
        except Exception as e:  # noqa: BLE001 - any model error: say which input shape failed
            raise ValueError(f"the model failed on an example input of shape {shape}: {type(e).__name__}: {e}; "
                             f"pass the input shape the model expects (batch, channels, height, width)") from e
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


@dataclass
class LayerFormat:
    """How a layer's weight is stored and run: kind "block", "nm" or "dense", with what was measured."""

    kind: str
    zero_fraction: float  # exactly-zero weights
    zero_block_fraction: float | None = None  # all-zero blocks (None: block does not divide the layer)
    block_density: float | None = None  # kept blocks / blocks
    n: int | None = None
    m: int | None = None
    reason: str = ""
    fits_24: bool = False  # every group of 4 input channels keeps <= 2 (runs on 2:4 tensor cores)
    block: tuple[int, int] | None = None  # (rows, cols) of the blocks counted in block_density

    @property
    def sparse(self) -> bool:
        return self.kind in ("block", "nm")

    @property
    def label(self) -> str:
        """Short format name for tables; block formats give the share of blocks KEPT (not pruned)."""
        if self.kind == "block":
            size = f" {self.block[0]}x{self.block[1]}" if self.block else ""
            return f"block{size}, {self.block_density:.0%} kept"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return "dense"

    def to_dict(self) -> dict:
        return asdict(self)


def _nm_pattern(w: torch.Tensor):
    if w.dim() < 2:
        return None
    ci = w.shape[1]
    nz = (w != 0).movedim(1, -1)
    for n, m in NM_PATTERNS:
        if ci % m:
            continue
        per_group = nz.reshape(*nz.shape[:-1], ci // m, m).sum(-1)
        if int(per_group.max()) <= n:
            return n, m
    return None


def _fits_24(w: torch.Tensor) -> bool:
    if w.dim() < 2 or w.shape[1] % 4:
        return False
    nz = (w != 0).movedim(1, -1)
    return int(nz.reshape(*nz.shape[:-1], w.shape[1] // 4, 4).sum(-1).max()) <= 2


@torch.no_grad()
def block_grid(w: torch.Tensor, block) -> torch.Tensor:
    """Bool (Co/bo, Ci/bi) grid, True where a block (over all kernel positions) has a nonzero."""
    bo, bi = block
    co, ci = w.shape[:2]
    k = math.prod(w.shape[2:])
    x = (w != 0).reshape(co // bo, bo, ci // bi, bi, k)
    return x.any(dim=(1, 3, 4))


@torch.no_grad()
def detect_format(name: str, w: torch.Tensor, block=(8, 8), groups: int = 1,
                  on_incompatible: str = "error", where: str = "") -> LayerFormat:
    """Decide block / N:M / dense for one plain weight (see the module docstring)."""
    if on_incompatible not in ("error", "dense"):
        raise ValueError(f"on_incompatible must be 'error' or 'dense', got {on_incompatible!r}")
    w = w.detach()
    zero_fraction = float((w == 0).float().mean()) if w.numel() else 0.0
    bo, bi = block
    divides = w.dim() in (2, 4) and w.shape[0] % bo == 0 and w.shape[1] % bi == 0
    if groups != 1:
        return LayerFormat("dense", zero_fraction, reason=f"grouped conv (groups={groups}): stored dense")
    if divides:
        grid = block_grid(w, block)
        zero_blocks = 1.0 - float(grid.float().mean())
        if zero_blocks > 0:
            return LayerFormat("block", zero_fraction, zero_blocks, 1.0 - zero_blocks,
                               reason=f"{zero_blocks:.1%} of its {bo}x{bi} blocks are zero", block=(bo, bi))
    else:
        zero_blocks = None
    nm = _nm_pattern(w) if zero_fraction > 0 else None
    if nm is not None:
        return LayerFormat("nm", zero_fraction, zero_blocks, None if zero_blocks is None else 1 - zero_blocks,
                           nm[0], nm[1], reason=f"every group of {nm[1]} input channels keeps <= {nm[0]}",
                           fits_24=_fits_24(w))
    if not divides and zero_fraction >= SPARSE_LOOKING:
        msg = (f"layer {name!r}{where} has weight shape {tuple(w.shape)} with {zero_fraction:.0%} zero weights, "
               f"but its channels ({w.shape[0]} out, {w.shape[1]} in) are not divisible by the block {bo}x{bi}, "
               f"and its zeros are not N:M")
        if on_incompatible == "error":
            raise IncompatibleLayer(msg + "; use a block that divides both (e.g. block=(4, 4)), pad the layer, or "
                                    "pass on_incompatible='dense' (CLI: --on-incompatible dense) to store it dense")
        return LayerFormat("dense", zero_fraction, None, None, reason=msg + ": stored dense (on_incompatible='dense')")
    reason = "no zero blocks and not N:M"
    if zero_fraction >= SPARSE_LOOKING:
        reason += f" ({zero_fraction:.0%} scattered zeros: unstructured, stored dense)"
    elif not divides:
        reason = f"channels not divisible by the {bo}x{bi} block"
    return LayerFormat("dense", zero_fraction, zero_blocks, None if zero_blocks is None else 1.0, reason=reason)
