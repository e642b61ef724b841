"""One-shot conversion of a trained model to a pattern: magnitude pruning and AdaPrune, and `nmsparse prune`.

- ``magnitude_prune(model, "2:4")``: zero by magnitude for N:M, N:M-T or blockRxC (``parse_pattern``);
- ``adaprune(model, calib_x, "2:4")``: magnitude, mean absorption, per-layer reconstruction, BN recalibration;
- ``prune_trained_model(model, "2:4", optimizer)``: prune and freeze the pattern for fine-tuning (as apex ASP);
- ``prune_checkpoint``: the ``nmsparse prune`` command on a training checkpoint, with the baselines.

A new one-shot method is one new file here beside these.
"""

from .adaprune import adaprune, check_settings, recalibrate_bn
from .command import calibration_set, prune_checkpoint
from .convert import frozen_config, prune_trained_model
from .magnitude import (PATTERNS, Pattern, absorb_mean_, layer_mask, magnitude_prune, parse_pattern, prunable_layers,
                        prune_blocks, weight_mask)

__all__ = ["adaprune", "magnitude_prune", "recalibrate_bn", "parse_pattern", "Pattern", "PATTERNS", "weight_mask",
           "layer_mask",
           "absorb_mean_", "prunable_layers", "prune_blocks", "check_settings", "prune_checkpoint", "calibration_set", "prune_trained_model",
           "frozen_config"]
