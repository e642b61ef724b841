"""Resuming a run: the saved config must describe the run being continued; the previous checkpoint is kept."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import yaml

from ..models.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401  (the run's checkpoint I/O)
from .schedule import LENGTH_INDEPENDENT_SCHEDULES
from .config import config_from_dict

# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
# sparsity.weight.kernel picks where products run, not what they compute (older checkpoints lack it).
# How often checkpoints are written does not change what is computed either.
RESUMABLE_DIFFERENCES = {"epochs", "progress", "device", "eval_every", "name", "data.root", "data.workers",
                         "sparsity.weight.kernel", "checkpoint_every_steps", "checkpoint_every_minutes"}


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before `path` is kept: checkpoint.pt -> checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def keep_previous(path: str | Path) -> None:
    """Make previous_path(path) the file now at `path` (a hard link where the file system has them), atomically."""
    path, prev = Path(path), previous_path(path)
    tmp = prev.with_name(prev.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def load_resumable(path: str | Path, map_location="cpu") -> tuple[dict, Path, str | None]:
    """(state, the file it came from, a note) for resuming from `path`, or from the previous checkpoint beside it
    when `path` is missing, truncated or corrupt (the note says so). Without a loadable previous checkpoint the
    error is `path`'s."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return load_checkpoint(path, map_location), path, None
    except (ValueError, FileNotFoundError) as e:
        if not prev.is_file():
            raise
        error = e
    try:
        state = load_checkpoint(prev, map_location)
    except (ValueError, FileNotFoundError):
        raise error from None
    why = str(error).split(" (", 1)[0].split(";", 1)[0]
    return state, prev, f"{why}; resuming from the previous checkpoint {prev} instead"


def _show(value) -> str:
    """A value for a message: repr for scalars and lists, one-line YAML for a whole section."""
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return repr(value)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ (ignoring those that may change on resume), as 'key: saved -> current'.

    Sections present on both sides are compared key by key; a section on one side only (dense vs sparse, weight
    vs gradient sparsity) is one difference, and so is a section's `kind` (its other keys mean other things).
    """
    diffs = []
    for key in sorted(set(saved) | set(current)):
        full, a, b = prefix + key, saved.get(key), current.get(key)
        if full in RESUMABLE_DIFFERENCES or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            if a.get("kind") != b.get("kind"):
                diffs.append(f"{full}.kind: {a.get('kind')!r} -> {b.get('kind')!r}")
            else:
                diffs += config_differences(a, b, full + ".")
        else:
            diffs.append(f"{full}: {_show(a)} -> {_show(b)}")
    return diffs


def check_config(path: str | Path, state: dict, current: dict) -> None:
    """ValueError listing the keys (other than RESUMABLE_DIFFERENCES) where `current` differs from the saved config."""
    saved = state.get("config", {})
    try:  # keys added to the config since the checkpoint was written compare as their defaults
        saved = config_from_dict(saved).to_dict()
    except (ValueError, KeyError, TypeError):
        pass
    diffs = config_differences(saved, current)
    if diffs:
        raise ValueError(f"checkpoint {path} was written by a different config ({'; '.join(diffs)}); "
                         f"use the same config to resume, or another --out (or --restart) to start a new run")


def check_resume(path: str | Path, state: dict, current: dict, steps_per_epoch: int | None = None) -> str | None:
    """Refuse a resume that would not continue the saved run as the `current` config describes it.

    The config must match (check_config). A changed `epochs` must not be fewer than the run already has (with
    `steps_per_epoch`, counting the steps of a checkpoint written inside an epoch), and may only grow under a
    schedule whose learning rate does not depend on the run's length (otherwise the steps taken followed another
    curve than a fresh run of the new length). Returns a note when epochs grew, else None.
    """
    check_config(path, state, current)
    saved = state.get("config", {})
    old, new = saved.get("epochs"), current.get("epochs")
    if old is None or new is None or old == new:
        return None
    done = min(state.get("epoch", 0), old)  # a fractional run's last epoch counts as the fraction
    if steps_per_epoch and state.get("epoch_step") and math.ceil(new * steps_per_epoch) < state.get("step", 0):
        done = state["step"] / steps_per_epoch  # inside an epoch: the steps taken count
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
