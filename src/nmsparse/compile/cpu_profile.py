"""The cpu profile for this machine: the shipped one where it was measured on this CPU model, otherwise
one measured here (``calibrate_cpu``) and cached per CPU model and thread count.

The cpu cost model's rates are those of the processor that was measured: on another one its estimates
can be off by tens of percent (an Intel Xeon ran 25-37% slower than the shipped AMD EPYC profile
predicted). ``resolve_cpu_profile`` picks, for the shipped name ``"cpu"``:

1. with ``calibrate=True``: a fresh measurement, written to the cache;
2. the cached profile of this CPU model and thread count, ``cached_profile_path(threads)``:
   ``$XDG_CACHE_HOME/nmsparse/cpu-<model-slug>-<threads>t.yaml`` (``~/.cache`` without XDG_CACHE_HOME;
   ``$NMSPARSE_CACHE_DIR`` replaces the whole directory);
3. the shipped ``targets/cpu.yaml`` when it was measured on this CPU model (and thread count);
4. otherwise, with ``auto_calibrate=True`` (``nmsparse bench deploy``), a measurement now, cached for
   next time; without it (``nmsparse compile``), the shipped profile and a warning that says so.

A profile given by path, dict or Target is used as it is, with the same warning when it was measured
on another CPU model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..common.system import cpu_name
from .profiles import ProfileError, Target, load_target

__all__ = ["cache_dir", "cached_profile_path", "profile_cpu", "cpu_mismatch", "resolve_cpu_profile", "SHIPPED"]

SHIPPED = "cpu"  # the shipped profile's target name
_MACHINE = re.compile(r"^(?P<cpu>.*?), \d+ logical cores?(,|$)")


def cache_dir() -> Path:
    """Where nmsparse caches measured profiles: $NMSPARSE_CACHE_DIR, else $XDG_CACHE_HOME/nmsparse, else
    ~/.cache/nmsparse."""
    if os.environ.get("NMSPARSE_CACHE_DIR"):
        return Path(os.environ["NMSPARSE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nmsparse"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cached_profile_path(threads: int = 1, cpu: str | None = None) -> Path:
    """The cache file of the cpu profile for a CPU model (default: this one) and a thread count."""
    return cache_dir() / f"cpu-{_slug(cpu or cpu_name())}-{threads}t.yaml"


def profile_cpu(params: dict) -> str | None:
    """The CPU model a cpu profile was measured on (from its ``machine`` line), None where it does not say."""
    m = _MACHINE.match(str(params.get("machine", "")))
    return m.group("cpu").strip() if m else None


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).lower() == " ".join(b.split()).lower()


def cpu_mismatch(target: Target, cpu: str | None = None) -> str | None:
    """A warning when ``target`` (a cpu profile) was measured on another CPU model than ``cpu`` (this one)."""
    measured_on = profile_cpu(target.params)
    here = cpu or cpu_name()
    if measured_on is None or _same(measured_on, here):
        return None
    return (f"WARNING: the cpu profile {target.source} was measured on a different processor ({measured_on}); "
            f"this machine is {here}. Its estimates can be off by tens of percent here (on an Intel Xeon the "
            f"shipped AMD EPYC profile estimated 25-37% low).")


def _calibrate(threads, quick, backend, log, calibrate_fn) -> Target:
    """Measure this CPU with `threads` threads; the profile is cached (where the cache can be written)."""
    path = cached_profile_path(threads)
    if calibrate_fn is None:
        from .calibrate import calibrate_cpu as calibrate_fn
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log(f"cannot create the cache directory {path.parent} ({e.strerror or e}): the profile is not kept")
        path = None
    log(f"calibrating a cpu profile for this CPU ({cpu_name()}, {threads} thread{'s' if threads != 1 else ''}; "
        f"a few minutes, once)" + (f" -> {path}" if path else ""))
    params = calibrate_fn(path, threads=threads, quick=quick, backend=backend, log=lambda *a: None)
    if path is None:
        tgt = load_target(params)
        tgt.source = "a calibration of this CPU (not cached)"
        return tgt
    return load_target(path)


def resolve_cpu_profile(profile="cpu", *, threads: int | None = 1, calibrate: bool = False,
                        auto_calibrate: bool = False, quick: bool = False, backend: str = "auto", log=print,
                        calibrate_fn=None) -> tuple[Target, str | None]:
    """(the cpu profile to estimate with, a note on where it came from or a warning; None when nothing to say).

    threads: the thread count the estimates are for (None: the profile's own, e.g. for ``nmsparse compile``,
    which measures with the profile's threads; the cache is then looked up for 1 thread). calibrate_fn
    replaces ``calibrate_cpu`` (tests).
    """
    named = isinstance(profile, str) and profile == SHIPPED
    want = threads or 1
    if calibrate:
        tgt = _calibrate(want, quick, backend, log, calibrate_fn)
        return tgt, f"cpu profile calibrated now on this CPU: {tgt.source}"
    if not named:
        tgt = load_target(profile)
        return tgt, cpu_mismatch(tgt) if tgt.kind == "cpu" else None
    cached = cached_profile_path(want)
    if cached.exists():
        try:
            tgt = load_target(cached)
            return tgt, f"cpu profile for this CPU from the cache {cached} (measured {tgt.get('measured', '?')})"
        except ProfileError as e:
            log(f"ignoring the cached cpu profile: {e}")
    shipped = load_target(SHIPPED)
    mismatch = cpu_mismatch(shipped)
    other_threads = threads is not None and shipped.get("threads") != threads
    if mismatch is None and not other_threads:
        return shipped, None
    if auto_calibrate:
        why = mismatch or (f"the shipped cpu profile was measured with {shipped.get('threads')} thread(s), "
                           f"this run uses {threads}.")
        log(why)
        tgt = _calibrate(want, quick, backend, log, calibrate_fn)
        return tgt, (f"cpu profile calibrated on this CPU on first use: {tgt.source}, used from now on "
                     f"(--calibrate measures it again)")
    if mismatch is None:  # the thread count alone differs: the caller says so in its own words
        return shipped, None
    return shipped, (f"{mismatch} Add --calibrate to measure this CPU once (a few minutes); the profile is "
                     f"cached at {cached} and used from then on.")
