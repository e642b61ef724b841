"""Checkpoints that resume exactly: atomic writes, weights_only loads, and a config check."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from .schedule import LENGTH_INDEPENDENT_SCHEDULES

FORMAT_VERSION = 1
# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
# sparsity.weight.kernel picks where products run, not what they compute (older checkpoints lack it).
RESUMABLE_DIFFERENCES = {"epochs", "progress", "device", "eval_every", "name", "data.root", "data.workers",
                         "sparsity.weight.kernel"}


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the run's other files follow the umask
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    except (PermissionError, IsADirectoryError, FileNotFoundError):
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError,
            UnicodeDecodeError, AttributeError, IndexError, TypeError, OSError) as e:
        # A truncated zip archive can surface as OSError [Errno 22] from the reader's seek.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path} cannot be loaded as a PyTorch checkpoint ({type(e).__name__}: {first[:200]}); "
                         f"a training checkpoint that fails here is truncated or corrupt: resume from an earlier "
                         f"one, or start over with --restart or in another --out") from None
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
    """ValueError listing the keys (other than RESUMABLE_DIFFERENCES) where `current` differs from the saved config."""
    diffs = config_differences(state.get("config", {}), current)
    if diffs:
        raise ValueError(f"checkpoint {path} was written by a different config ({'; '.join(diffs)}); "
                         f"use the same config to resume, or another --out (or --restart) to start a new run")


def check_resume(path: str | Path, state: dict, current: dict) -> str | None:
    """Refuse a resume that would not continue the saved run as the `current` config describes it.

    The config must match (check_config). A changed `epochs` must not be fewer than the run already has, and may
    only grow under a schedule whose learning rate does not depend on the run's length (otherwise the steps taken
    followed another curve than a fresh run of the new length). Returns a note when epochs grew, else None.
    """
    check_config(path, state, current)
    saved = state.get("config", {})
    old, new = saved.get("epochs"), current.get("epochs")
    if old is None or new is None or old == new:
        return None
    done = min(state.get("epoch", 0), old)  # a fractional run's last epoch counts as the fraction
    if new < done:
        raise ValueError(f"checkpoint {path} holds a run that already has {done:g} epochs (its config says epochs: "
                         f"{old:g}), so it cannot become a {new:g}-epoch run: use another --out for a {new:g}-epoch "
                         f"run, or --restart to replace this one")
    schedule = (current.get("schedule") or {}).get("name")
    if schedule not in LENGTH_INDEPENDENT_SCHEDULES:
        raise ValueError(f"checkpoint {path} was trained for epochs: {old:g} (done: {done:g}) under the {schedule} "
                         f"schedule, whose learning rate depends on the run's length: resuming it with epochs: "
                         f"{new:g} would not match a fresh {new:g}-epoch run. Keep epochs: {old:g} to resume it; "
                         f"for {new:g} epochs use another --out, or --restart to replace this run")
    return (f"extending the run in {Path(path).parent} from {old:g} to {new:g} epochs (the {schedule} schedule does "
            f"not depend on the run's length, so this equals a fresh {new:g}-epoch run)")
