"""Block-sparse model compiler: compact files, per-layer plans on hardware profiles, estimates, CPU execution.

- ``compile_model(model, target, example_input_shape)`` -> ``CompiledModel`` (plans, compact tensors);
  ``compile_to_dir(model_or_path, target, out_dir)`` also writes model.safetensors, plan.json,
  report.md and charts (the ``nmsparse compile`` command).
- Targets are YAML profiles in ``targets/`` (``aie2``, ``gpu``, ``cpu``) or a user's file:
  ``load_target``, ``list_targets``; ``calibrate_cpu`` measures this machine for the cpu profile;
  ``resolve_cpu_profile`` picks the cpu profile for this CPU (cached per CPU model, or a warning).
- ``load_compact`` / ``load_compact_state`` read a compact file back (CRC-checked, bit-exact);
  ``load_executable`` rebuilds the model from it with its block-sparse layers on the CPU kernels.
- ``resolve_model``: a model to compile from a module, a checkpoint or a model name (``--prune`` zeroes blocks
  by magnitude through ``nmsparse.prune``). One-shot pruning itself lives in ``nmsparse.prune``.
- ``aie2_table`` reproduces the paper's AIE2 estimates for ResNet-50, Inception-v3 and VGG-16.
"""

from .cpu_profile import resolve_cpu_profile
from .compiler import CompiledModel, LayerPlan, compile_model, compile_to_dir, load_compact, load_compact_state
from .cost import LayerEstimate, PlanError, SubVolume, estimate_layer, plan_aie2, time_series
from .layers import IncompatibleLayer, LayerFormat, LayerSpec, NoSparseLayers, detect_format, extract_layers
from .networks import aie2_table, format_aie2_table, network_specs
from .load import evaluate_compiled, load_executable, rebuild_model
from .profiles import ProfileError, Target, list_targets, load_target
from .source import resolve_model
from .runtime import build_executable


def calibrate_cpu(*args, **kwargs):
    """Measure this CPU and write a cpu profile (see ``calibrate.calibrate_cpu``)."""
    from .calibrate import calibrate_cpu as _calibrate

    return _calibrate(*args, **kwargs)


__all__ = ["compile_model", "compile_to_dir", "CompiledModel", "LayerPlan", "load_compact", "load_compact_state",
           "resolve_model", "LayerEstimate", "PlanError", "SubVolume", "estimate_layer", "plan_aie2",
           "time_series", "IncompatibleLayer", "LayerFormat", "LayerSpec", "NoSparseLayers", "detect_format",
           "extract_layers", "aie2_table", "format_aie2_table", "network_specs", "ProfileError", "Target", "list_targets",
           "load_target", "calibrate_cpu", "resolve_cpu_profile", "load_executable", "rebuild_model", "evaluate_compiled", "build_executable"]
