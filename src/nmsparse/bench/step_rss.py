"""Peak resident memory (RSS) of a training step per method, for `nmsparse bench step`: each in its own process.

RSS is a high-water mark per process, so the methods cannot share one: each method's model is built,
sparsified, attached and trained for a few eager steps in a fresh Python (``python -m
nmsparse.bench.step_rss``), which reports its peak RSS (Linux's VmHWM) and its RSS before the model was built
(the interpreter and its libraries). The periodic methods recompute their masks in those steps
(``recompute_every`` is set to ``steps - 1``), so a recomputation's workspace is in the peak.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys

__all__ = ["measure_rss"]


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's peak RSS. On Linux VmHWM: ``ru_maxrss`` keeps the high-water mark across exec, i.e. the
    forking parent's RSS (measured: every child reported the bench process's 2.9 GB)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def _child(spec: dict) -> dict:
    """In the fresh process: build, sparsify, attach, `steps` eager training steps; peak and base RSS in MB."""
    import torch

    from ..nn.mask_step import attach
    from ..nn.sparsify import sparsify
    from .step import METHODS, StepOptions, _batch, _build, _train_step, make_optimizer

    o = StepOptions(**spec["options"])
    torch.set_num_threads(o.threads)
    base = _rss_now_mb() if os.path.exists("/proc/self/statm") else _peak_mb()
    torch.manual_seed(o.seed)
    model = _build(spec["kind"], o).train()
    x, y = _batch(spec["kind"], o, torch.Generator().manual_seed(o.seed))
    cfg = METHODS[spec["method"]].make(spec["kind"], max(1, spec["steps"] - 1))
    if cfg is not None:
        sparsify(model, cfg)
    opt = make_optimizer(model, o)
    if cfg is not None:
        attach(model, opt)
    for _ in range(spec["steps"]):
        _train_step(model, opt, x, y)
    return {"peak_mb": _peak_mb(), "base_mb": base}


def measure_rss(kind: str, methods: list[str], options, steps: int, log=print, timeout_s: float = 1800) -> dict[str, dict]:
    """{method: {"peak_mb", "base_mb"}} from one fresh process per method (eager, `steps` steps each).

    RuntimeError with the child's last lines if one fails (a bench that hides a crash would report nothing)."""
    fields = {**dataclasses.asdict(options), "models": (kind,), "methods": None}
    out = {}
    for name in methods:
        spec = {"kind": kind, "method": name, "steps": steps, "options": fields}
        try:
            proc = subprocess.run([sys.executable, "-m", "nmsparse.bench.step_rss", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"peak-RSS process of {kind} {name} did not finish in {timeout_s} s (a C++ build "
                               f"waiting on a lock left by a killed process?)") from e
        if proc.returncode:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"peak-RSS process of {kind} {name} failed (exit {proc.returncode}):\n{tail}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  {kind} {name}: peak RSS {out[name]['peak_mb']:.0f} MB (process {out[name]['base_mb']:.0f} MB "
            f"before the model)")
    return out


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
