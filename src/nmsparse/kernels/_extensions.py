"""Building the package's C++ extensions from their sources in ``kernels/csrc/``, once and on first use.

``NativeExtension("nmsparse_x", ["x.cpp"], ...)`` compiles the named files with
``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja; the build is cached under
``~/.cache/torch_extensions``). The extension's name carries a hash of the sources' and csrc's headers' contents, the
flags and the torch version, so an edited source or another torch builds afresh instead of loading
a stale build. A failed build is remembered (``error``) and callers fall back to a torch path.
``NMSPARSE_NO_NATIVE=1`` disables every extension.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

CSRC = Path(__file__).with_name("csrc")
_DIAGNOSTIC = re.compile(r":\d+(:\d+)?: (fatal )?error:")


def arch_flags() -> list[str]:
    """Vector ISA flags for this CPU (AVX-512, AVX2 or none), as ATen detects it."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - very old torch: stay portable
        cap = "DEFAULT"
    if cap.startswith("AVX512"):
        return ["-mavx512f", "-mavx512dq", "-mavx2", "-mfma"]
    if cap == "AVX2":
        return ["-mavx2", "-mfma"]
    return []


def build_name(name: str, sources: str | Sequence[str], extra_cflags: Sequence[str] = (),
               extra_ldflags: Sequence[str] = ()) -> str:
    """``<name>_<hash>``: the hash of the named sources, every header in csrc/ (any source may include one), the
    flags and the torch version, so that a change to any of them builds afresh."""
    paths = [CSRC / s for s in ([sources] if isinstance(sources, str) else sources)]
    h = hashlib.sha1()
    for p in paths + sorted(CSRC.glob("*.h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update((" ".join(extra_cflags) + "|" + " ".join(extra_ldflags) + "|" + torch.__version__).encode())
    return f"{name}_{h.hexdigest()[:10]}"


def build_extension(name: str, sources: str | Sequence[str], extra_cflags: Sequence[str] = (),
                    extra_ldflags: Sequence[str] = ()):
    """Compile (or load the cached build of) ``csrc/<sources>`` as the module ``build_name(...)``; raises on failure."""
    paths = [CSRC / s for s in ([sources] if isinstance(sources, str) else sources)]
    from torch.utils.cpp_extension import get_default_build_root, load

    full = build_name(name, sources, extra_cflags, extra_ldflags)
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [root / full / "lock", *root.glob(f"*/{full}/lock")]:  # torch adds e.g. py311_cpu/ by default
        clear_stale_lock(lock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(full, [str(p) for p in paths], extra_cflags=list(extra_cflags),
                    extra_ldflags=list(extra_ldflags), verbose=False)


STALE_LOCK_S = 600.0  # a build takes about a minute; a lock this old was left by a killed process


def clear_stale_lock(lock: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove a build lock that a killed build left behind (torch would wait on it forever); True if removed."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    warnings.warn(f"removing the stale build lock {lock} ({age / 60:.0f} minutes old, left by an interrupted "
                  f"build)", RuntimeWarning, stacklevel=3)
    lock.unlink(missing_ok=True)
    return True


class NativeExtension:
    """A C++ extension built from csrc/ on first ``load()``: the module, or None with the reason in ``error``.

    ``arch=True`` adds this CPU's vector flags (``arch_flags``) after ``extra_cflags``.
    """

    def __init__(self, name: str, sources: str | Sequence[str], extra_cflags: Sequence[str] = (),
                 extra_ldflags: Sequence[str] = (), arch: bool = True):
        self.name, self.sources = name, sources
        self.extra_cflags, self.extra_ldflags, self.arch = list(extra_cflags), list(extra_ldflags), arch
        self.module = None
        self.error: str | None = None  # None when built, or before the first attempt
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self.module is not None or self.error is not None:
                return self.module
            if os.environ.get("NMSPARSE_NO_NATIVE", "") not in ("", "0"):
                self.error = "disabled by NMSPARSE_NO_NATIVE"
                return None
            flags = self.extra_cflags + (arch_flags() if self.arch else [])
            try:
                self.module = build_extension(self.name, self.sources, flags, self.extra_ldflags)
            except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                # the compiler's first diagnostics ("file:line:col: error: ...") and torch's last line ("ninja: build
                # stopped" alone says nothing; torch's first line, "Error building extension", is the command line)
                lines = str(e).strip().splitlines() or [repr(e)]
                first = [ln.strip() for ln in lines[:-1] if _DIAGNOSTIC.search(ln)][:3]
                self.error = f"{type(e).__name__}: {' | '.join(first + [lines[-1]])}"
                self.module = None
            return self.module
