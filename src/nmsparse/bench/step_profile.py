"""Where a training step's time and memory go, for `nmsparse bench step`: the profiler window of one method."""

from __future__ import annotations

import torch

from ..nn import profiling

__all__ = ["profile_window", "STEP_SCOPE"]

STEP_SCOPE = "nmsparse.bench.step"


def _tensor_bytes(model, opt) -> int:
    """Bytes of the storages of parameters, gradients, buffers and optimizer state (each storage once)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
    return sum(storages.values())


def profile_window(step, model, opt, steps: int, period: int | None, done: int, eager: bool) -> dict:
    """Scope shares (eager) and peak tensor bytes over `steps` profiled calls of step() (one training step), after
    `done` steps.

    The profiler reports a free only for memory allocated while it runs, so one profiled step comes
    first, uncounted; a periodic method first steps on to a recompute step, so that the mask replaced
    in the counted window was allocated under the profiler too."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range((-done) % period if period else 0):
        step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        alive = _tensor_bytes(model, opt)
        for _ in range(steps):
            with record_function(STEP_SCOPE):
                step()
    # from the profiler's raw events (key_averages() would build every event's tree: seconds per step)
    scopes, allocs = [], []  # (name, start, duration); (time, +bytes allocated / -bytes freed)
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if name == "[memory]":
            allocs.append((e.start_ns(), e.nbytes()))
        elif name == STEP_SCOPE or name in profiling.SCOPES:
            scopes.append((name, e.start_ns(), e.duration_ns()))
    first = min((t for name, t, _ in scopes if name == STEP_SCOPE), default=0)  # the counted window's start
    busy = dict.fromkeys((STEP_SCOPE,) + profiling.SCOPES, 0)
    for name, t, duration in scopes:
        busy[name] += duration if t >= first else 0
    shares = None
    if eager and busy[STEP_SCOPE] > 0:
        shares = {s: busy[s] / busy[STEP_SCOPE] for s in profiling.SCOPES}
        shares["rest"] = max(0.0, 1.0 - sum(shares.values()))
    now = peak = 0
    for t, nbytes in sorted(allocs, key=lambda a: a[0]):
        if t >= first:
            now += nbytes
            peak = max(peak, now)
    return {"shares": shares, "peak_bytes": alive + peak, "profiled_steps": steps}
