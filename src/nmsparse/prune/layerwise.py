"""Layer-wise one-shot pruning from calibration data: forward order, inputs captured by forward hooks,
each layer seen as a matrix product, and the sequential driver that Wanda and SparseGPT share.

Every layer these methods prune is seen as ``y = X W2^T (+ bias)``, one (X, W2) per conv group:

- ``nn.Linear``: W2 is the weight (out, in); X is the input with its leading dims flattened (rows, in);
- ``nn.Conv2d`` (any stride, dilation, padding and padding mode, groups): W2 is ``conv_to_2d(weight)``
  (Co, kh*kw*Ci/groups), columns in channels-last order, and X holds the input's patches (the conv's own
  padding, then ``F.unfold``) in that order, one row per sample and output position. Magnitude's N:M groups
  (M consecutive input channels at one (co, kh, kw)) are then M consecutive columns of W2, and N:M-T is
  transposable on W2, as in ``magnitude_prune``.

Hugging Face transformers' ``Conv1D`` (GPT-2) is not handled: ``prunable_layers`` does not select it, for
magnitude pruning and AdaPrune either; swap it for an ``nn.Linear`` with weight ``conv1d.weight.t()`` first.

``prune_layerwise`` runs a method over the selected layers in forward order. Each layer's calibration
statistic is summed over the inputs it receives in ``model(calib_x)`` (fed in chunks) with the layers before
it already pruned (sequential, as both papers do), then the method prunes that layer, in place. Each
layer costs one pass of the model over calib_x; X is built in float64, in pieces of whole samples of at
most about 2^25 values (256 MB), and only the summed statistic is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..patterns import conv_from_2d, conv_to_2d
from ..nn.layers import is_linear_like, out_in_view
from .magnitude import FilterFn, Pattern, check_pattern_fits, parse_pattern, prunable_layers

CALIB_SHAPES = ("a batch that model(batch) takes, first dim = samples (n >= 1): (n, T) token ids (torch.long) "
                "for a language model, (n, C, H, W) images for a CNN")


@torch.no_grad()
def forward_order(model: nn.Module, layers, x: torch.Tensor, called: set | None = None) -> list[tuple[str, nn.Module]]:
    """The layers sorted by the order of their first call in a forward pass on x (uncalled ones last).
    ``called``, when a set, receives the names of the layers that were called."""
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
    if called is not None:
        called.update(order)
    return sorted(layers, key=lambda nm: order.get(nm[0], len(layers) + 1))


@torch.no_grad()
def stream(model: nn.Module, mod: nn.Module, x: torch.Tensor, chunk: int,
           on_call: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """Run model over x in chunks of ``chunk`` samples, calling on_call(input, output) at every call of mod."""
    h = mod.register_forward_hook(lambda _m, inp, out: on_call(inp[0], out))
    try:
        for s in range(0, len(x), chunk):
            model(x[s:s + chunk])
    finally:
        h.remove()


def capture(model: nn.Module, mod: nn.Module, x: torch.Tensor, chunk: int, want: str) -> torch.Tensor:
    """The input (want='in') or output (want='out') of mod over every call in model(x), concatenated."""
    got: list[torch.Tensor] = []
    stream(model, mod, x, chunk, lambda i, o: got.append((i if want == "in" else o).detach().clone()))
    return torch.cat(got)


def _conv_pads(mod: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of the conv's input, as torch applies it ('same': extra on the right)."""
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return (0, 0, 0, 0)
        (th, tw) = (d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = mod.padding
    return (pw, pw, ph, ph)


@dataclass
class LayerView:
    """One layer as ``y = X W2^T``: ``weight2d`` (out, K), a float64 copy; ``inputs`` (groups, rows, K);
    ``set_weight2d`` writes a 2-D weight back."""

    name: str
    mod: nn.Module

    @property
    def groups(self) -> int:
        return getattr(self.mod, "groups", 1)

    def weight2d(self) -> torch.Tensor:
        w = out_in_view(self.mod).detach()  # a Conv1D's (in, out) weight as (out, in)
        return (conv_to_2d(w) if w.dim() == 4 else w).to(torch.float64, copy=True)

    def set_weight2d(self, w2: torch.Tensor) -> None:
        w = out_in_view(self.mod)
        with torch.no_grad():
            w.copy_(conv_from_2d(w2, w.shape) if w.dim() == 4 else w2)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input of one call as X (groups, rows, K), in float64."""
        x = x.detach().to(torch.float64)
        mod = self.mod
        if is_linear_like(mod):
            return x.reshape(1, -1, out_in_view(mod).shape[1])
        if x.dim() == 3:  # an unbatched conv input
            x = x[None]
        pads = _conv_pads(mod)
        if any(pads):
            x = F.pad(x, pads, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
        kh, kw = mod.kernel_size
        cols = F.unfold(x, (kh, kw), dilation=mod.dilation, stride=mod.stride)  # (N, Ci*kh*kw, L), ci-major
        n, _, length = cols.shape
        g = mod.groups
        cols = cols.reshape(n, g, mod.in_channels // g, kh, kw, length).permute(1, 0, 5, 3, 4, 2)
        return cols.reshape(g, n * length, kh * kw * (mod.in_channels // g))

    def input_pieces(self, x: torch.Tensor, max_elements: int = 1 << 25):
        """``inputs`` of one call in pieces of whole samples, each X about max_elements float64 values at
        most (a conv's patches are kh*kw times its input), so a large chunk never builds one huge X."""
        linear = is_linear_like(self.mod)
        batched = x.dim() >= (2 if linear else 4)
        if not batched or len(x) <= 1:
            yield self.inputs(x)
            return
        per_sample = x[0].numel() * (1 if linear else self.mod.kernel_size[0]
                                     * self.mod.kernel_size[1])
        step = max(1, max_elements // max(per_sample, 1))
        for s in range(0, len(x), step):
            yield self.inputs(x[s:s + step])

    def rows_of_group(self, g: int) -> slice:
        per = out_in_view(self.mod).shape[0] // self.groups
        return slice(g * per, (g + 1) * per)


@dataclass
class OneShotReport:
    """What ``wanda_prune`` / ``sparsegpt_prune`` did: ``layers`` holds one dict per pruned layer, in the order
    they were pruned (name, weight shape, calibration rows of X, seconds, and the method's own entries);
    ``seconds`` is the whole call, calibration forwards included."""

    method: str
    pattern: str
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return [r["name"] for r in self.layers]

    def __str__(self) -> str:
        head = f"{self.method} {self.pattern}: {len(self.layers)} layers in {self.seconds:.2f} s"
        lines = [head]
        for r in self.layers:
            extra = "".join(f", {k} {v:.4g}" for k, v in r.items() if isinstance(v, float) and k != "seconds")
            lines.append(f"  {r['name']} {tuple(r['shape'])}: {r['rows']} rows, {r['seconds']:.2f} s{extra}")
        return "\n".join(lines)


def check_nm_pattern(p: Pattern, method: str) -> None:
    if p.kind not in ("nm", "nmt"):
        raise ValueError(f"{method} supports N:M and transposable N:M-T patterns (e.g. 2:4, 4:8, 4:8-T), not {p}; "
                         "for block patterns use magnitude_prune or adaprune")


def check_calib(model: nn.Module, calib_x, layers) -> list[tuple[str, nn.Module]]:
    """The layers in forward order on calib_x[:1]; ValueError naming calib_x when it does not run through the
    model or has no samples, or naming a selected layer that model(calib_x) never calls."""
    if not isinstance(calib_x, torch.Tensor):
        raise ValueError(f"calib_x must be a torch.Tensor, {CALIB_SHAPES}; got {type(calib_x).__name__}")
    if calib_x.dim() == 0 or len(calib_x) == 0:
        raise ValueError(f"calib_x has no samples (shape {tuple(calib_x.shape)}): it must be {CALIB_SHAPES}")
    called: set = set()
    try:
        ordered = forward_order(model, layers, calib_x[:1], called)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"calib_x (shape {tuple(calib_x.shape)}, dtype {calib_x.dtype}) does not run through the "
                         f"model: model(calib_x[:1]) raised {type(e).__name__}: {e}. calib_x must be {CALIB_SHAPES}"
                         ) from e
    missing = [name for name, _ in layers if name not in called]
    if missing:
        raise ValueError(_never_called(missing[0]))
    return ordered


def _never_called(name: str) -> str:
    return (f"layer {name!r} is not called in model(calib_x), so it has no calibration inputs (nn.MultiheadAttention's "
            "out_proj is such a layer: attention reads its weight without calling it); exclude it with filter_fn")


# stat(X (groups, rows, K) float64, running sum or None) -> the new running sum
Stat = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# prune(view, summed statistic, calibration rows, pattern) -> the method's entries for the layer's report
PruneLayer = Callable[[LayerView, torch.Tensor, int, Pattern], dict]


def prune_layerwise(model: nn.Module, calib_x: torch.Tensor, pattern: str | Pattern, filter_fn: FilterFn | None,
                    method: str, stat: Stat, prune_layer: PruneLayer, chunk: int,
                    check_layer: Callable[[str, nn.Module, Pattern], None] | None = None) -> OneShotReport:
    """Prune model's selected layers in place, in forward order (see the module doc). Everything that can be
    refused (pattern, chunk, layer shapes, ``check_layer``, calib_x) is refused before any layer changes."""
    t0 = time.perf_counter()
    p = parse_pattern(pattern)
    check_nm_pattern(p, method)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk (calibration samples per forward) must be an int >= 1, got {chunk!r}")
    layers = prunable_layers(model, filter_fn)  # nn.Linear and nn.Conv2d only
    check_pattern_fits(layers, p)
    for name, mod in layers:
        if check_layer is not None:
            check_layer(name, mod, p)
    modes = {m: m.training for m in model.modules()}
    report = OneShotReport(method, str(p))
    try:
        model.eval()
        for name, mod in check_calib(model, calib_x, layers):
            t1 = time.perf_counter()
            view = LayerView(name, mod)
            acc: dict = {"sum": None, "rows": 0}

            def on_call(inp, _out, view=view, acc=acc):
                for x in view.input_pieces(inp):
                    acc["sum"], acc["rows"] = stat(x, acc["sum"]), acc["rows"] + x.shape[1]

            stream(model, mod, calib_x, chunk, on_call)
            if acc["rows"] == 0:
                raise ValueError(_never_called(name))
            with torch.no_grad():
                extra = prune_layer(view, acc["sum"], acc["rows"], p)
            report.layers.append({"name": name, "shape": tuple(mod.weight.shape), "rows": acc["rows"],
                                  "seconds": time.perf_counter() - t1, **extra})
    finally:
        for m, t in modes.items():
            m.train(t)
    report.seconds = time.perf_counter() - t0
    return report
