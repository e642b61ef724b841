"""Checkpoints: atomic writes, weights_only loads, and the record that rebuilds the model without data.

A checkpoint is a dict saved by ``save_checkpoint``: ``model`` (the state dict), ``config`` (the
training config as a dict) and ``model_record`` ({name, kwargs, sample_shape, num_classes}), plus
whatever the writer adds (optimizer, step, ...). ``load_model`` rebuilds the model from the record
and the config's sparsity section alone, so evaluation, pruning and compilation never build a data
loader to learn a shape.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..data import NUM_CLASSES, sample_shape
from ..nn import sparsify
from .registry import build_for_data

FORMAT_VERSION = 1


def model_record(name: str, kwargs: dict, sample: tuple[int, ...], num_classes: int) -> dict:
    """What ``load_model`` needs to rebuild a model: its registry name and arguments, one sample's shape, classes."""
    return {"name": name, "kwargs": dict(kwargs), "sample_shape": list(sample), "num_classes": int(num_classes)}


def record_from_config(config: dict) -> dict:
    """The model record of a training config (dict); checkpoints written before records existed use it."""
    data = config.get("data") or {}
    name = data.get("name", "digits")
    return model_record(config["model"]["name"], config["model"].get("kwargs") or {},
                        sample_shape(name, data.get("image_size", 224)), NUM_CLASSES[name])


def build_from_record(record: dict) -> nn.Module:
    """An untrained model of the recorded architecture."""
    return build_for_data(record["name"], record.get("kwargs") or {}, tuple(record["sample_shape"]),
                          record["num_classes"])


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


def load_model(checkpoint: str | Path | dict, map_location="cpu") -> tuple[nn.Module, dict]:
    """(model with the checkpoint's weights, masks and counters, the checkpoint dict), from a path or a loaded dict.

    The model is sparsified as the saved config says before its state is loaded, so a sparse run comes
    back with its parametrizations; a pruned checkpoint (``sparsity: null``) comes back as plain modules.
    """
    state = load_checkpoint(checkpoint, map_location) if not isinstance(checkpoint, dict) else checkpoint
    where = checkpoint if not isinstance(checkpoint, dict) else "the checkpoint"
    if "config" not in state or "model" not in state:
        raise ValueError(f"{where} holds no config/model: not written by nmsparse train or prune")
    record = state.get("model_record") or record_from_config(state["config"])
    model = build_from_record(record)
    if state["config"].get("sparsity") is not None:
        sparsify(model, state["config"]["sparsity"])
    model.load_state_dict(state["model"])
    return model, state
