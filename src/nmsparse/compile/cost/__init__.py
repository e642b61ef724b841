"""Cost models: per-layer plans and time estimates, one module per target kind.

- ``common``: PlanError, the time-series rule, WeightPattern, SubVolume, LayerEstimate.
- ``aie2``: the block-sparsity paper's sub-volume planner (SPEC section 5; see its docstring).
- ``gpu``: a roofline per layer (see targets/gpu.yaml).
- ``cpu``: a model of this package's kernels with coefficients measured by ``calibrate_cpu``
  (see targets/cpu.yaml).

Times follow the time-series rule (``common.time_series``): per-step maxima of (load, compute,
write) summed over the steps, the plain sum for a single step.

``estimate_layer`` dispatches on the target's kind through ``ESTIMATORS``: a new target is one
module with an ``estimate_<kind>(spec, fmt, params, grid=None, **options)`` and one line there.
"""

from __future__ import annotations

from ..layers import LayerFormat, LayerSpec
from .aie2 import estimate_aie2, plan_aie2
from .common import LayerEstimate, PlanError, SubVolume, WeightPattern, time_series
from .cpu import DEFAULT_CACHE, cpu_dense_time, cpu_kind, cpu_sparse_time, estimate_cpu, kernel_work
from .gpu import estimate_gpu

__all__ = ["SubVolume", "LayerEstimate", "WeightPattern", "PlanError", "time_series", "plan_aie2",
           "estimate_gpu", "estimate_cpu", "estimate_layer", "cpu_dense_time", "cpu_sparse_time", "cpu_kind",
           "kernel_work", "DEFAULT_CACHE", "estimate_aie2", "ESTIMATORS"]

# target kind -> estimator(spec, fmt, target.params, grid, **options)
ESTIMATORS = {"aie2": estimate_aie2, "gpu": estimate_gpu, "cpu": estimate_cpu}


def estimate_layer(spec: LayerSpec, fmt: LayerFormat | None, target, grid=None, **kw) -> LayerEstimate:
    """Dispatch on the target's kind (a profiles.Target)."""
    estimator = ESTIMATORS.get(target.kind)
    if estimator is None:
        raise ValueError(f"no cost model for target kind {target.kind!r}")
    return estimator(spec, fmt, target.params, grid, **kw)
