"""Training configs: nested dataclasses loaded from YAML, with clear errors on unknown or mistyped keys."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..nn.config import SparsityConfig


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | imagefolder
    root: str | None = None  # None: the default data directory (../shared/data when present)
    batch_size: int = 128
    test_batch_size: int = 1024
    flip: bool = False
    translate: int = 0
    cutout: int = 0
    workers: int = 4  # imagefolder only
    image_size: int = 224  # imagefolder only


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    kwargs: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False  # the references exclude norm parameters (and biases) from decay
    label_smoothing: float = 0.0
    batch_lr_scaling: bool = False  # lr is given per 256 images (ffcv style) when true


@dataclass
class ScheduleConfig:
    name: str = "onecycle"  # triangular | onecycle | cosine | constant
    warmup_epochs: float = 0.0  # triangular: epoch of the peak; cosine: linear warm-up length
    start_factor: float = 0.0  # lr at step 0 as a fraction of the peak (triangular, cosine warm-up)
    end_factor: float = 0.0  # lr at the end as a fraction of the peak


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = 0
    epochs: float = 10
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sparsity: SparsityConfig | None = None
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    channels_last: bool = False
    tta_flip: bool = False
    deterministic: bool = False
    device: str = "auto"
    eval_every: int = 1  # epochs
    progress: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sparsity"] = self.sparsity.to_dict() if self.sparsity is not None else None
        return d


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig}


def _coerce(value, annotation, where: str):
    """Check a YAML scalar against the field's type; ints are accepted for floats."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for h in hints:
        if h is type(None) and value is None:
            return None
        if h is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if h is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if h in (str, bool, dict) and isinstance(value, h):
            return value
    names = " or ".join(getattr(h, "__name__", str(h)) for h in hints)
    raise ValueError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")


def _build(cls, d, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {where}.{key}{hint} (valid: {', '.join(valid)})")
        if key in _SECTIONS and cls is TrainConfig:
            kwargs[key] = _build(_SECTIONS[key], value or {}, f"{where}.{key}")
        elif key == "sparsity" and cls is TrainConfig:
            kwargs[key] = SparsityConfig.from_dict(value) if value else None
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def config_from_dict(d: dict) -> TrainConfig:
    return _build(TrainConfig, d, "config")


def _parse_value(text: str):
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=value` overrides (YAML-parsed values) to a nested dict, creating sections."""
    d = dict(d)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = _parse_value(text)
    return d


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file (or the defaults when path is None) plus --set overrides."""
    d = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    try:
        return config_from_dict(apply_overrides(d, list(overrides)))
    except (ValueError, TypeError) as e:
        where = f" in {path}" if path is not None else ""
        raise ValueError(f"{e}{where}") from None
