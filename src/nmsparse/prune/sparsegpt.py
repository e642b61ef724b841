"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"): layer-wise optimal-brain-surgeon pruning to N:M, with the kept weights updated to compensate.

For a layer seen as ``y = X W^T`` (see ``layerwise``; X (rows, K) holds every calibration token, sample or
conv output position), with everything below computed in float64:

1. H = 2 X^T X / rows (X^T X summed in float64 over the calibration chunks; H's scale does not change the
   result, since the dampening is relative to it);
2. dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0; then H += lambda I, lambda = percdamp * mean(diag H);
3. H^-1 by Cholesky, and U = the upper Cholesky factor of H^-1 (H^-1 = U^T U). Row j of U is row j of the
   inverse Hessian of the columns j.. (the OBS downdates of the columns before j) over sqrt of its diagonal;
4. columns in blocks of ``blocksize`` (a multiple of M); at each column i that is a multiple of M the mask of
   columns i..i+M-1 keeps, in each row, the N largest OBS saliencies W_rj^2 / U_jj^2 (W as updated so far);
   then for each column i in turn, the pruned entries' error err = W_ri / U_ii updates the row's later
   columns of the block, W[r, i:] -= err * U[i, i:] (which zeroes W_ri), and the block's errors update the
   columns after the block at once (the paper's lazy batch update, W[:, end:] -= Err @ U[block, end:]).

N:M-T, transposable (our construction; the paper has no transposable variant): at each M-column strip the
mask is ``transposable_mask`` of the strip's saliencies, i.e. of each M x M tile (rows in groups of M), so
every tile keeps N per row and per column; the OBS updates are then as above. The columns of later strips
are chosen after the earlier strips' updates, so the final mask is transposable tile by tile.

Supports nn.Linear and nn.Conv2d (one H per conv group; N:M-T on a grouped conv needs Co/groups divisible
by M). The bias is not changed. Layers are pruned one at a time in forward order, each from its inputs with
the layers before it already pruned, as the paper does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.transposable import transposable_mask  # the compiled exact solver on the CPU, else PyTorch
from ..patterns import nm_mask
from .layerwise import LayerView, OneShotReport, check_nm_pattern, prune_layerwise
from .magnitude import FilterFn, Pattern, parse_pattern


def _gram(x: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    g = x.transpose(1, 2) @ x  # (groups, K, K)
    return g if acc is None else acc.add_(g)


def check_sparsegpt_settings(blocksize, percdamp, m: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1 or blocksize % m:
        raise ValueError(f"blocksize (columns per lazy update) must be a positive multiple of M = {m}, "
                         f"got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < float("inf"):
        raise ValueError(f"percdamp (dampening, a fraction of the mean Hessian diagonal) must be a float >= 0, "
                         f"got {percdamp!r}")


def inverse_hessian_factor(h: torch.Tensor, w: torch.Tensor, percdamp: float, name: str = "") -> torch.Tensor:
    """U (upper, H^-1 = U^T U) for H (K, K) float64, after the dead-input fix (which zeroes w's dead columns
    in place) and the dampening. ValueError naming the layer when H + lambda I is not positive definite."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += percdamp * torch.diagonal(h).mean()
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError(f"layer {name!r}: the dampened Hessian of its calibration inputs is not positive definite "
                         f"(percdamp {percdamp}); raise percdamp or use more calibration samples")
    return u


def sparsegpt_matrix(w: torch.Tensor, h: torch.Tensor, p: Pattern, blocksize: int = 128, percdamp: float = 0.01,
                     name: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT on one matrix: w (rows, K), h = the Hessian (K, K) of its inputs (any positive scale).
    Returns (the pruned and updated weight, the bool keep mask, the OBS loss sum_i err_i^2 / 2 per row),
    all float64. See the module doc."""
    w = w.to(torch.float64).clone()
    u = inverse_hessian_factor(h.to(torch.float64), w, percdamp, name)
    rows, k = w.shape
    n, m = p.n, p.m
    keep = torch.zeros((rows, k), dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, dtype=torch.float64, device=w.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d1 = torch.diagonal(u1)
        for i in range(i2 - i1):
            if i % m == 0:  # i1 is a multiple of m, so i1 + i is too
                sal = w1[:, i:i + m].square() / d1[i:i + m].square()
                keep[:, i1 + i:i1 + i + m] = (transposable_mask(sal, n, m) if p.kind == "nmt"
                                              else nm_mask(sal, n, m, dim=1))
            q = w1[:, i] * keep[:, i1 + i]
            err = (w1[:, i] - q) / d1[i]
            losses += err.square() / 2
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w, keep, losses


def _make_prune_layer(blocksize: int, percdamp: float):
    def prune_layer(view: LayerView, gram: torch.Tensor, rows: int, p: Pattern) -> dict:
        w2 = view.weight2d()
        gram = gram.to(w2.device)
        out = torch.empty_like(w2)
        loss = change = total = 0.0
        for g in range(view.groups):
            sl = view.rows_of_group(g)
            h = gram[g] * (2.0 / rows)
            new, _, losses = sparsegpt_matrix(w2[sl], h, p, blocksize, percdamp, view.name)
            out[sl] = new
            loss += float(losses.sum())
            delta = new - w2[sl]  # the layer's calibration error, from the undampened Gram matrix
            change += float(((delta @ gram[g]) * delta).sum())
            total += float(((w2[sl] @ gram[g]) * w2[sl]).sum())
        view.set_weight2d(out)
        return {"obs_loss": loss, "rel_error": change / total if total > 0 else 0.0}
    return prune_layer


def _check_layer(name: str, mod: nn.Module, p: Pattern) -> None:
    groups = getattr(mod, "groups", 1)
    if p.kind == "nmt" and groups > 1 and (mod.weight.shape[0] // groups) % p.m:
        raise ValueError(f"sparsegpt: layer {name!r} (weight {tuple(mod.weight.shape)}, groups {groups}) cannot take "
                         f"pattern {p}: each conv group's {mod.weight.shape[0] // groups} output channels must be "
                         f"divisible by {p.m} (tiles within a group); exclude it with filter_fn or use {p.n}:{p.m}")


def sparsegpt_prune(model: nn.Module, calib_x: torch.Tensor, pattern: str | Pattern,
                    filter_fn: FilterFn | None = None, blocksize: int = 128, percdamp: float = 0.01, *,
                    chunk: int = 32) -> OneShotReport:
    """Prune the selected layers of model to pattern ("2:4", "4:8", "4:8-T", any N:M or N:M-T) by SparseGPT on
    calibration data, in place (see nmsparse.prune.sparsegpt's module doc), and return the report; each
    layer's entry adds ``obs_loss`` (the OBS loss the algorithm tracks) and ``rel_error``
    (||X dW^T||^2 / ||X W^T||^2 on the layer's calibration inputs).

    ``calib_x``: a batch that ``model(calib_x)`` takes, first dim = samples, fed in chunks of ``chunk``
    samples: (n, T) token ids (torch.long) for a language model, (n, C, H, W) images for a CNN.
    ``filter_fn(module, name)`` selects layers as for ``magnitude_prune``. ``blocksize``: columns per lazy
    update, a multiple of M. ``percdamp``: the dampening, a fraction of the mean Hessian diagonal.
    Settings, patterns, layer shapes and calib_x are checked before any layer changes; a Hessian that is not
    positive definite (possible only with percdamp = 0) stops the run with the layers before it pruned.
    """
    p = parse_pattern(pattern)
    check_nm_pattern(p, "sparsegpt")
    check_sparsegpt_settings(blocksize, percdamp, p.m)
    return prune_layerwise(model, calib_x, p, filter_fn, "sparsegpt", _gram,
                           _make_prune_layer(blocksize, float(percdamp)), chunk, check_layer=_check_layer)
