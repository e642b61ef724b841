"""Per-iteration learning-rate schedules: the factor of the peak lr at a given step."""

from __future__ import annotations

import math

SCHEDULES = ("triangular", "onecycle", "cosine", "constant")
# Schedules whose lr at a step does not depend on the total steps: only these let a run be extended on resume.
LENGTH_INDEPENDENT_SCHEDULES = ("constant",)


def lr_factor(name: str, step: int, total: int, warmup: int, start: float = 0.0, end: float = 0.0) -> float:
    """Fraction of the peak lr at `step` of `total`, with `warmup` steps to the peak.

    triangular: linear start -> 1 at `warmup`, linear 1 -> end at `total` (SDGP's CIFAR recipe).
    onecycle: the same shape with cosine ramps (warm-up defaults to 30% when 0).
    cosine: linear warm-up, then cosine decay to `end` (SR-STE's ImageNet recipe).
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name must be one of {SCHEDULES}, got {name!r}")
    if name == "constant":
        return 1.0
    total = max(total, 1)
    if name == "onecycle" and warmup == 0:
        warmup = max(1, int(0.3 * total))
    if step < warmup:
        t = step / warmup
        ramp = t if name != "onecycle" else (1 - math.cos(math.pi * t)) / 2
        return start + (1 - start) * ramp
    t = min(1.0, (step - warmup) / max(total - warmup, 1))
    if name == "triangular":
        return 1 + (end - 1) * t
    return end + (1 - end) * (1 + math.cos(math.pi * t)) / 2
