"""One-shot conversion of a trained model to a pattern: magnitude, AdaPrune, Wanda, SparseGPT, and `nmsparse prune`.

- ``magnitude_prune(model, "2:4")``: zero by magnitude for N:M, N:M-T or blockRxC (``parse_pattern``);
- ``adaprune(model, calib_x, "2:4")``: magnitude, mean absorption, per-layer reconstruction, BN recalibration;
- ``wanda_prune(model, calib_x, "2:4")``: score |W| x input-feature norm on calibration data, no weight update;
- ``sparsegpt_prune(model, calib_x, "2:4")``: layer-wise OBS pruning with the kept weights updated (SparseGPT);
- ``prune_trained_model(model, "2:4", optimizer)``: prune and freeze the pattern for fine-tuning (as apex ASP);
- ``prune_checkpoint``: the ``nmsparse prune`` command on a training checkpoint, with the baselines.

A new one-shot method is one new file here beside these.
"""

from .adaprune import adaprune, check_settings, recalibrate_bn
from .command import calibration_set, prune_checkpoint
from .convert import frozen_config, prune_trained_model
from .layerwise import OneShotReport
from .magnitude import (PATTERNS, Pattern, absorb_mean_, layer_mask, magnitude_prune, parse_pattern, prunable_layers,
                        prune_blocks, weight_mask)
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune

__all__ = ["adaprune", "magnitude_prune", "wanda_prune", "sparsegpt_prune", "OneShotReport", "recalibrate_bn",
           "parse_pattern", "Pattern", "PATTERNS", "weight_mask", "layer_mask", "absorb_mean_", "prunable_layers",
           "prune_blocks", "check_settings", "prune_checkpoint", "calibration_set", "prune_trained_model",
           "frozen_config"]
