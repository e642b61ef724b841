"""Which implementation to run: Triton or torch for pruning, sparse or dense for a product.

- ``use_triton(x, m)``: the Triton pruning kernels apply (CUDA tensor, supported m and dtype,
  triton importable, NMSPARSE_DISABLE_TRITON unset).
- ``Dispatcher``: for a key (op, shape, dtype, device) measures the dense and the sparse
  implementation once (through an injectable timer), checks that they agree, caches the
  decision (in memory and optionally in a JSON file) and from then on returns it. The sparse
  path is chosen only where it measured faster by ``min_speedup``; every decision, and every
  sparse path that failed or disagreed, is logged once and listed by ``report()``, so nmsparse
  never makes training slower without saying so.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["use_triton", "triton_status", "Decision", "Dispatcher", "cuda_timer", "default_dispatcher",
           "DISABLE_TRITON_ENV", "CACHE_ENV"]

log = logging.getLogger("nmsparse.kernels")

DISABLE_TRITON_ENV = "NMSPARSE_DISABLE_TRITON"
CACHE_ENV = "NMSPARSE_DISPATCH_CACHE"
_CACHE_VERSION = 1
_triton_importable: bool | None = None


def _triton_ok() -> bool:
    global _triton_importable
    if _triton_importable is None:
        from .triton_prune import triton_available

        _triton_importable = triton_available()
    return _triton_importable


def _device_type(x: torch.Tensor) -> str:
    return x.device.type


def triton_status(x: torch.Tensor, m: int | None = None) -> tuple[bool, str]:
    """(True, "") if the Triton pruning kernels apply to x (grouped by m), else (False, why)."""
    from .triton_prune import SUPPORTED_DTYPES, SUPPORTED_M

    if os.environ.get(DISABLE_TRITON_ENV, "") not in ("", "0"):
        return False, f"{DISABLE_TRITON_ENV} is set"
    if not isinstance(x, torch.Tensor) or _device_type(x) != "cuda":
        return False, "not a CUDA tensor"
    if x.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {x.dtype} (supported: {SUPPORTED_DTYPES})"
    if m is not None and m not in SUPPORTED_M:
        return False, f"m={m} (supported: {SUPPORTED_M})"
    if not _triton_ok():
        return False, "triton is not installed (pip install 'nmsparse[triton]')"
    return True, ""


def use_triton(x: torch.Tensor, m: int | None = None) -> bool:
    """True if the Triton pruning kernels should handle x: a CUDA tensor of a supported dtype,
    m (if given) supported, triton importable and the NMSPARSE_DISABLE_TRITON variable unset
    (or "0"). CPU tensors always use the torch implementation."""
    return triton_status(x, m)[0]


@dataclass
class Decision:
    """A cached dispatch decision: "sparse" or "dense", with what it was based on."""

    choice: str
    dense_s: float | None = None
    sparse_s: float | None = None
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        if self.dense_s and self.sparse_s:
            return self.dense_s / self.sparse_s
        return None


def _device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return dev.type


def cuda_timer(warmup: int = 3, repeats: int = 20) -> Callable:
    """A timer for the Dispatcher: median seconds of each function over `repeats` runs, timed with
    CUDA events (synchronizing), after `warmup` runs; interleaved so that clocks drift alike."""

    def timer(dense_fn: Callable, sparse_fn: Callable) -> tuple[float, float]:
        for _ in range(warmup):
            dense_fn()
            sparse_fn()
        times: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(repeats):
            for i, fn in enumerate((dense_fn, sparse_fn)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[i].append(start.elapsed_time(end) / 1e3)
        return statistics.median(times[0]), statistics.median(times[1])

    return timer


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


class Dispatcher:
    """Chooses dense or sparse per (op, shape, dtype, device), measuring each key once.

    timer(dense_fn, sparse_fn) -> (dense_seconds, sparse_seconds) is called once per new key
    (default: ``cuda_timer()``). Before timing, the outputs are compared when `check` is set:
    a relative error (L2) above `tol` (per dtype; default 2e-2 for half types, 1e-4 otherwise)
    makes the key dense. A sparse_fn that raises makes it dense too. The sparse path is chosen
    when dense_seconds >= min_speedup * sparse_seconds.

    cache_path: a JSON file read at construction and rewritten after each new decision, keyed
    by op, shape, dtype and device name (the GPU model), so a decision measured on one GPU model
    is reused only on that model. enabled=False always answers "dense" without measuring.
    """

    def __init__(self, timer: Callable | None = None, cache_path: str | os.PathLike | None = None,
                 min_speedup: float = 1.05, check: bool = True, tol: dict | None = None,
                 enabled: bool = True):
        if min_speedup <= 0:
            raise ValueError(f"min_speedup must be > 0, got {min_speedup}")
        self.timer = timer
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.min_speedup = float(min_speedup)
        self.check = check
        self.tol = {torch.float16: 2e-2, torch.bfloat16: 2e-2}
        self.tol.update(tol or {})
        self.enabled = enabled
        self._decisions: dict[str, Decision] = {}
        self._lock = threading.Lock()
        if self.cache_path is not None and self.cache_path.exists():
            self.load(self.cache_path)

    @staticmethod
    def key(op: str, shape, dtype, device) -> str:
        shape = "x".join(str(int(s)) for s in shape)
        dtype = str(dtype).replace("torch.", "")
        return f"{op}|{shape}|{dtype}|{_device_name(device)}"

    def decision(self, op: str, shape, dtype, device) -> Decision | None:
        """The cached decision for a key, or None if it was never measured."""
        return self._decisions.get(self.key(op, shape, dtype, device))

    def choose(self, op: str, shape, dtype, device, dense_fn: Callable, sparse_fn: Callable) -> str:
        """"sparse" or "dense" for this key; the first call for a key measures (running both
        functions), later calls return the cached answer without running anything."""
        if not self.enabled:
            return "dense"
        k = self.key(op, shape, dtype, device)
        with self._lock:
            found = self._decisions.get(k)
            if found is not None:
                return found.choice
            d = self._measure(dense_fn, sparse_fn, dtype)
            self._decisions[k] = d
            self._announce(k, d)
            if self.cache_path is not None:
                self.save(self.cache_path)
            return d.choice

    def _measure(self, dense_fn, sparse_fn, dtype) -> Decision:
        try:
            if self.check:
                ref, out = dense_fn(), sparse_fn()
                err = _rel_err(out, ref)
                tol = self.tol.get(dtype, 1e-4)
                if not err <= tol:
                    return Decision("dense", reason=f"sparse result differs: relative error {err:.3g} > {tol:g}")
            timer = self.timer if self.timer is not None else cuda_timer()
            dense_s, sparse_s = timer(dense_fn, sparse_fn)
        except Exception as e:  # an unsupported shape, a missing backend: dense, and say so
            return Decision("dense", reason=f"sparse path failed: {type(e).__name__}: {e}")
        dense_s, sparse_s = float(dense_s), float(sparse_s)
        if dense_s >= self.min_speedup * sparse_s:
            return Decision("sparse", dense_s, sparse_s, f"sparse {dense_s / sparse_s:.2f}x faster")
        return Decision("dense", dense_s, sparse_s,
                        f"sparse not faster enough ({dense_s / sparse_s:.2f}x < {self.min_speedup:g}x)")

    @staticmethod
    def _announce(key: str, d: Decision) -> None:
        level = logging.INFO if d.choice == "sparse" else logging.WARNING
        log.log(level, "nmsparse dispatch %s -> %s (%s)", key, d.choice, d.reason)

    def report(self) -> list[dict]:
        """Every decision: key fields, choice, times, speed-up and reason."""
        rows = []
        for k, d in sorted(self._decisions.items()):
            op, shape, dtype, device = k.split("|")
            rows.append(dict(op=op, shape=shape, dtype=dtype, device=device, **asdict(d),
                             speedup=d.speedup))
        return rows

    def clear(self) -> None:
        with self._lock:
            self._decisions.clear()

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        data = {"version": _CACHE_VERSION, "torch": torch.__version__,
                "decisions": {k: asdict(d) for k, d in self._decisions.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        """Merge the decisions of a cache file (a file of another version is ignored, with a warning)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            log.warning("nmsparse dispatch cache %s unreadable (%s): ignored", path, e)
            return
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
            log.warning("nmsparse dispatch cache %s has another format version: ignored", path)
            return
        for k, d in data.get("decisions", {}).items():
            self._decisions[k] = Decision(**d)


_default: Dispatcher | None = None


def default_dispatcher() -> Dispatcher:
    """The process-wide Dispatcher (CUDA-event timer; cache file from NMSPARSE_DISPATCH_CACHE)."""
    global _default
    if _default is None:
        _default = Dispatcher(cache_path=os.environ.get(CACHE_ENV) or None)
    return _default
