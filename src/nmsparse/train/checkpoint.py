"""Checkpoints that resume exactly: atomic writes, weights_only loads, and a config check."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
RESUMABLE_DIFFERENCES = {"epochs", "progress", "device", "eval_every", "name", "data.root", "data.workers"}


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with weights_only=True; a missing, truncated or foreign file gets a message naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        found = sorted(path.rglob("checkpoint.pt"))
        hint = f", e.g. {found[0]}" if found else " (none found under it)"
        raise ValueError(f"{path} is a directory: pass the checkpoint.pt file inside a run directory{hint}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError,
            UnicodeDecodeError, AttributeError, IndexError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path} cannot be loaded as a PyTorch checkpoint ({type(e).__name__}: {first[:200]}); "
                         f"a training checkpoint that fails here is truncated or corrupt: resume from an earlier "
                         f"one or start a new run in another --out") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise ValueError(f"{path} is not an nmsparse training checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {state['format_version']}, "
                         f"this nmsparse reads version {FORMAT_VERSION}")
    return state


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ (ignoring those that may change on resume), as 'key: saved -> current'."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_DIFFERENCES or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def check_config(path: str | Path, state: dict, current: dict) -> None:
    diffs = config_differences(state.get("config", {}), current)
    if diffs:
        raise ValueError(f"checkpoint {path} was written by a different config ({'; '.join(diffs)}); "
                         f"use the same config to resume, or another --out to start a new run")
