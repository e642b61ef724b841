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

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import out_in_view
from .layerwise import capture, forward_order
from .magnitude import (FilterFn, Pattern, absorb_mean_, check_pattern_fits, layer_mask, parse_pattern,
                        prunable_layers)

def check_settings(iters, batch, prefix: str = "") -> None:
    """ValueError unless iters is an int >= 0 and batch an int >= 1 (prefix: "--" for CLI flags)."""
    for key, value, low, what in (("iters", iters, 0, "Adam steps per layer"),
                                  ("batch", batch, 1, "cached samples per Adam step")):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{prefix}{key} ({what}) must be an int >= {low}, got {value!r}")


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
    check_pattern_fits(layers, p)
    if calib_x is None or len(calib_x) == 0:
        raise ValueError("adaprune needs at least one calibration sample")
    check_settings(iters, batch)
    was_training = model.training
    model.eval()
    dense = copy.deepcopy(model).eval()
    dense_mods = dict(dense.named_modules())
    layers = forward_order(model, layers, calib_x[:1])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    it = layers
    if progress:
        from tqdm import tqdm
        it = tqdm(layers, desc="adaprune")
    for name, mod in it:
        x = capture(model, mod, calib_x, chunk, "in")
        y = capture(dense, dense_mods[name], calib_x, chunk, "out")
        w = mod.weight
        with torch.no_grad():
            mask = layer_mask(mod, p)  # in w's layout; computed on the (out, in) view (a Conv1D's W^T)
            dense_w = w.detach().clone()
            w.mul_(mask)
            mse_mag = F.mse_loss(mod(x), y).item()
            if absorb_mean:
                w.copy_(dense_w)
                absorb_mean_(out_in_view(mod, w), out_in_view(mod, mask), p)
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
