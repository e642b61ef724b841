"""Wanda (Sun, Liu, Bair, Kolter, 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
one-shot pruning by |weight| x input-feature norm, no weight update.

For a layer seen as ``y = X W^T`` (see ``layerwise``; X has one row per calibration token, sample or conv
output position), the score of weight W_ij is

    S_ij = |W_ij| * ||X_:,j||_2,

the L2 norm of input feature j over every calibration row (summed in float64). N:M keeps the N largest
scores in each group of M consecutive inputs of one output row (the paper compares within each row; with
N:M, within each group of the row); N:M-T keeps the transposable mask of S (``transposable_mask``, exact:
the largest kept score sum per M x M tile). The kept weights keep their values.

Layers are pruned one at a time in forward order, each from its inputs with the layers before it already
pruned, as the paper's code does. Supports nn.Linear and nn.Conv2d (one norm per conv group).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.transposable import transposable_mask  # the compiled exact solver on the CPU, else PyTorch
from ..patterns import nm_mask
from .layerwise import LayerView, OneShotReport, prune_layerwise
from .magnitude import FilterFn, Pattern


def _sum_squares(x: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    s = x.square().sum(1)  # (groups, K)
    return s if acc is None else acc.add_(s)


def wanda_scores(w2: torch.Tensor, sum_squares: torch.Tensor) -> torch.Tensor:
    """S = |W2| * ||X_j||: w2 (out, K), sum_squares (groups, K) of X per conv group (1 for a Linear)."""
    groups = sum_squares.shape[0]
    norms = sum_squares.sqrt().repeat_interleave(w2.shape[0] // groups, dim=0)
    return w2.abs() * norms


def wanda_mask(scores: torch.Tensor, p: Pattern) -> torch.Tensor:
    """Bool mask of a 2-D score matrix: N largest per M consecutive columns, or transposable for N:M-T."""
    if p.kind == "nmt":
        return transposable_mask(scores, p.n, p.m)
    return nm_mask(scores, p.n, p.m, dim=1)


def _prune_layer(view: LayerView, sum_squares: torch.Tensor, rows: int, p: Pattern) -> dict:
    w2 = view.weight2d()
    mask = wanda_mask(wanda_scores(w2, sum_squares.to(w2.device)), p)
    view.set_weight2d(w2 * mask)
    return {}


def wanda_prune(model: nn.Module, calib_x: torch.Tensor, pattern: str | Pattern, filter_fn: FilterFn | None = None,
                *, chunk: int = 32) -> OneShotReport:
    """Prune the selected layers of model to pattern ("2:4", "4:8", "4:8-T", any N:M or N:M-T) by Wanda's
    score |W_ij| * ||X_j||_2 on calibration data, in place (see nmsparse.prune.wanda's module doc), and
    return the report.

    ``calib_x``: a batch that ``model(calib_x)`` takes, first dim = samples, fed in chunks of ``chunk``
    samples: (n, T) token ids (torch.long) for a language model, (n, C, H, W) images for a CNN.
    ``filter_fn(module, name)`` selects layers as for ``magnitude_prune`` (default: all Linear and Conv2d but
    the output layer and a stem conv with <= 3 input channels). Patterns, layer shapes and calib_x are checked
    before any layer changes.
    """
    return prune_layerwise(model, calib_x, pattern, filter_fn, "wanda", _sum_squares, _prune_layer, chunk)
