"""The machine in one line (for benchmark tables and profiles), output paths checked before any work, and the CPU's
subnormal-float mode for a block of work."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: bool = True) -> str:
    """CPU, core count, torch version and (with `threads`) the threads torch uses now and Python's version.

    Profiles record it without threads, which they store in a field of their own.
    """
    base = f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}"
    if not threads:
        return base
    n = torch.get_num_threads()
    return f"{base} ({n} thread{'' if n == 1 else 's'}), Python {platform.python_version()}"


def check_parent_dirs(out: Path) -> None:
    """Refuse an output path under an existing file, before any work (`--out` of compile and prune)."""
    for parent in Path(out).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a directory")
            return


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch.device for a setting ("auto": CUDA when available), with a clear error for a bad or absent one.

    A bare "cuda" means the GPU of this process's local rank (torchrun), which becomes the current device.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def flushes_denormals() -> bool:
    """Whether CPU float ops now write a subnormal result as 0 (torch has a setter for the mode, no getter)."""
    return (torch.full((8,), 1e-20) * 1e-19).tolist()[0] == 0.0


@contextlib.contextmanager
def flush_denormal(enabled: bool = True):
    """``torch.set_flush_denormal(enabled)`` for the block, then the mode it found. The mode is per thread: threads
    started inside the block inherit it. Subnormal operands take a slow path on x86 CPUs (docs/benchmarks.md)."""
    before = flushes_denormals()
    torch.set_flush_denormal(enabled)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
