"""Training configs: nested dataclasses loaded from YAML, with clear errors on unknown or mistyped keys."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..common.text import check_keys, did_you_mean
from ..data import DATASETS, TEXT_DATASETS, DataConfig
from ..models import model_argument_error
from ..nn.config import SparsityConfig
from .schedule import SCHEDULES


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
    beta1: float = 0.9  # adamw
    beta2: float = 0.999  # adamw (nanoGPT's small models: 0.99)
    fused: bool = True  # adamw: torch's fused kernel where every parameter allows it (train/optim.py)
    grad_clip: float = 0.0  # max global gradient norm (0: off)
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
    # Subnormal floats read and written as 0 by CPU ops during the run (torch.set_flush_denormal, as TensorFlow and XLA
    # run on the CPU): a step meeting them ran up to 4x slower on an x86 CPU (SDGP rescale; docs/benchmarks.md).
    flush_denormal: bool = True
    device: str = "auto"
    eval_every: int = 1  # epochs
    progress: bool = True  # a progress bar on a terminal, a line about every 30 s otherwise
    # Checkpoints are written at every epoch end and also inside epochs, every k steps and/or every so many
    # minutes (0: off); a run resumes exactly from any of them.
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 10.0

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
        if h is float and isinstance(value, str) and _is_number(value):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
        if h is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if h in (str, bool, dict) and isinstance(value, h):
            return value
    names = " or ".join(getattr(h, "__name__", str(h)) for h in hints)
    raise ValueError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text)


def _build(cls, d, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    check_keys(d, [f.name for f in dataclasses.fields(cls)], where)
    kwargs = {}
    for key, value in d.items():
        if key in _SECTIONS and cls is TrainConfig:
            kwargs[key] = _build(_SECTIONS[key], value or {}, f"{where}.{key}")
        elif key == "sparsity" and cls is TrainConfig:
            kwargs[key] = SparsityConfig.from_dict(value) if value else None
        elif key == "amp" and cls is TrainConfig and value is False:  # YAML 1.1 reads a bare `off` as false
            kwargs[key] = "off"
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def config_from_dict(d: dict) -> TrainConfig:
    """A validated TrainConfig; ValueError naming the key for unknown keys, wrong types and bad values."""
    try:
        return validate(_build(TrainConfig, d, "config"))
    except TypeError as e:  # from SparsityConfig.from_dict and the dataclasses: still a user mistake
        raise ValueError(str(e)) from None


AMP_CHOICES = ("auto", "bf16", "fp16", "off")
OPTIMIZERS = ("sgd", "adamw")
# Common spellings of the dataset names, offered as "did you mean" (not accepted: one name per dataset).
DATASET_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
                   "cifar": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10", "imagenet": "imagefolder",
                   "image_folder": "imagefolder", "image-folder": "imagefolder", "sklearn-digits": "digits"}


def _choice(where: str, value, choices, aliases: dict | None = None) -> None:
    if value in choices:
        return
    close = (aliases or {}).get(str(value).lower())
    hint = f"; did you mean {close!r}?" if close else did_you_mean(value, choices)
    raise ValueError(f"{where} must be one of {', '.join(choices)}, got {value!r}{hint}")


def _at_least(where: str, value, low, what: str = "") -> None:
    if not value >= low:  # also catches NaN
        raise ValueError(f"{where} must be at least {low}{what}, got {value!r}")


def _in_range(where: str, value, low, high, high_open: bool = False, what: str = "") -> None:
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        raise ValueError(f"{where} must be in [{low}, {high}{')' if high_open else ']'}{what}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check choices and numeric ranges the types alone allow, so a bad value fails before any training."""
    _choice("config.data.name", cfg.data.name, DATASETS, DATASET_ALIASES)
    _choice("config.amp", cfg.amp, AMP_CHOICES)
    _choice("config.optim.name", cfg.optim.name, OPTIMIZERS)
    _choice("config.schedule.name", cfg.schedule.name, SCHEDULES)
    problem = model_argument_error(cfg.model.name, cfg.model.kwargs)
    if problem:
        raise ValueError(f"config.model: {problem}")
    if not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise ValueError(f"config.epochs must be a number > 0 (fractions train part of the last epoch), "
                         f"got {cfg.epochs!r}")
    _at_least("config.seed", cfg.seed, 0)
    _at_least("config.eval_every", cfg.eval_every, 1, " (evaluate every k epochs; the last epoch always is)")
    _at_least("config.checkpoint_every_steps", cfg.checkpoint_every_steps, 0, " (0: only at epoch ends)")
    if not (math.isfinite(cfg.checkpoint_every_minutes) and cfg.checkpoint_every_minutes >= 0):
        raise ValueError(f"config.checkpoint_every_minutes must be a finite number >= 0 (0 is off), "
                         f"got {cfg.checkpoint_every_minutes!r}")
    d = cfg.data
    _at_least("config.data.batch_size", d.batch_size, 1)
    _at_least("config.data.test_batch_size", d.test_batch_size, 1)
    _at_least("config.data.translate", d.translate, 0, " (random shift in pixels; 0 is off)")
    _at_least("config.data.cutout", d.cutout, 0, " (side of the zeroed square in pixels; 0 is off)")
    _at_least("config.data.workers", d.workers, 0, " (0 loads in the main process)")
    _at_least("config.data.image_size", d.image_size, 1)
    _at_least("config.data.block_size", d.block_size, 1, " (characters per training sequence)")
    _at_least("config.data.steps_per_epoch", d.steps_per_epoch, 0)
    _at_least("config.data.val_blocks", d.val_blocks, 0, " (0: the whole validation split)")
    if d.name in TEXT_DATASETS:
        if d.steps_per_epoch < 1:
            raise ValueError(f"config.data.steps_per_epoch must be >= 1 for text data ({d.name}): the random-block "
                             f"batches between evaluations, e.g. 250, got {d.steps_per_epoch}")
        if d.name == "text" and not d.path:
            raise ValueError("config.data.path is required for data.name: text (the UTF-8 file to train on)")
        _in_range("config.data.val_fraction", d.val_fraction, 0, 1, high_open=True)
        if d.val_fraction == 0:
            raise ValueError("config.data.val_fraction must be > 0: the validation split is the last fraction")
    o = cfg.optim
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ValueError(f"config.optim.lr must be a finite number > 0, got {o.lr!r}")
    _in_range("config.optim.momentum", o.momentum, 0, 1, high_open=True)
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise ValueError(f"config.optim.weight_decay must be a finite number >= 0, got {o.weight_decay!r}")
    _in_range("config.optim.label_smoothing", o.label_smoothing, 0, 1, high_open=True)
    _in_range("config.optim.beta1", o.beta1, 0, 1, high_open=True)
    _in_range("config.optim.beta2", o.beta2, 0, 1, high_open=True)
    if not (math.isfinite(o.grad_clip) and o.grad_clip >= 0):
        raise ValueError(f"config.optim.grad_clip must be a finite number >= 0 (0 is off), got {o.grad_clip!r}")
    s = cfg.schedule
    if not (math.isfinite(s.warmup_epochs) and s.warmup_epochs >= 0):
        raise ValueError(f"config.schedule.warmup_epochs must be a finite number >= 0, got {s.warmup_epochs!r}")
    _in_range("config.schedule.start_factor", s.start_factor, 0, 1, what=" (a fraction of the peak lr)")
    _in_range("config.schedule.end_factor", s.end_factor, 0, 1, what=" (a fraction of the peak lr)")
    return cfg


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
        if not all(parts):
            raise ValueError(f"--set {item!r}: the key must be dotted names like optim.lr, got {key!r}")
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is not None and not isinstance(node[p], dict):
                raise ValueError(f"--set {item}: {'.'.join(parts[:i + 1])} is a value ({node[p]!r}), "
                                 f"not a section with keys")
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = _parse_value(text)
    return d


# How run names spell methods (configs/: 'fmnist SDGP max 2:4', 'imagenet resnet50 SR-STE 2:4').
METHOD_NAMES = {"magnitude": "max", "random": "rnd", "srste": "SR-STE", "ste": "STE"}
# The sparsity keys a run name can state (as N:M with -T, method, block shape, block sparsity).
_STATED_KEYS = {"n", "m", "transposable", "method", "block", "sparsity"}


def _sparsity_sections(d: dict) -> dict | None:
    """{'weight': ..., 'grad': ...} of a config dict's sparsity, with defaults filled in; None when invalid."""
    s = d.get("sparsity")
    if not s:
        return {"weight": None, "grad": None}
    try:
        s = SparsityConfig.from_dict(s).to_dict()
    except (ValueError, TypeError):
        return None
    return {"weight": s.get("weight"), "grad": s.get("grad")}


def _statements(section: dict | None) -> dict[str, str]:
    """What a run name may say about a sparsity section, as the words it would use."""
    if not section:
        return {}
    out = {}
    if "n" in section and "m" in section:
        out["nm"] = f"{section['n']}:{section['m']}{'-T' if section.get('transposable') else ''}"
    if "method" in section:
        out["method"] = section["method"]
    if "block" in section:
        out["block"] = "x".join(str(b) for b in section["block"])
    if "sparsity" in section:
        out["sparsity"] = f"{section['sparsity']:.0%}"
    return out


def restate_sparsity(name: str, before: dict, after: dict) -> tuple[str, bool]:
    """`name` with the sparsity it states (N:M, method, block shape or sparsity) changed from `before`'s to `after`'s.

    Returns (name, True) when the name now states every change (or there is none), and (name with what could be
    changed, False) when a change cannot be said there: a section added or removed, another kind, a setting names
    do not state, or a word that is not in the name exactly once (or that the other section shares).
    """
    a, b = _sparsity_sections(before), _sparsity_sections(after)
    if a is None or b is None:
        return name, False
    tokens, complete = name.split(" "), True
    for sec, other in (("weight", "grad"), ("grad", "weight")):
        sa, sb = a[sec], b[sec]
        if sa == sb:
            continue
        if sa is None or sb is None or sa.get("kind") != sb.get("kind"):
            complete = False
            continue
        if {k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k)} - _STATED_KEYS:
            complete = False
        old, new, shared = _statements(sa), _statements(sb), _statements(a[other])
        for what, word in old.items():
            if new.get(what) == word:
                continue
            words = {word, METHOD_NAMES.get(word, word)} if what == "method" else {word}
            hits = [i for i, t in enumerate(tokens) if t in words]
            if len(hits) != 1 or shared.get(what) in words:
                complete = False
                continue
            tokens[hits[0]] = METHOD_NAMES.get(new[what], new[what]) if what == "method" else new[what]
    return " ".join(tokens), complete


def name_sparsity_overrides(d: dict, overrides: list[str], before: dict | None = None) -> dict:
    """Make the run name say what the --set sparsity... overrides changed (unless --set name= was given).

    The N:M, method or block sparsity the name states is rewritten (`before`: the config before the overrides),
    e.g. 'fmnist SDGP rescale 2:4' with --set sparsity.grad.n=1 becomes 'fmnist SDGP rescale 1:4'; what the name
    cannot state is appended, so a run made sparse from a dense config is not listed under the dense name, e.g.
    'digits dense [sparsity.grad.n=1]'.
    """
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    if "name" in keys:
        return d
    notes = [item.strip() for item, key in zip(overrides, keys) if key == "sparsity" or key.startswith("sparsity.")]
    if not notes:
        return d
    name, complete = restate_sparsity(str(d.get("name", "run")), before, d) if before is not None else \
        (str(d.get("name", "run")), False)
    return {**d, "name": name if complete else f"{name} [{', '.join(notes)}]"}


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
    overrides = list(overrides)
    merged = apply_overrides(d, overrides)  # its errors name the --set option already
    try:
        return config_from_dict(name_sparsity_overrides(merged, overrides, d))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{e}{_blame(d, overrides, str(e), path)}") from None


def _error(d: dict, overrides: list[str]) -> str | None:
    """The message config_from_dict gives for d with these overrides, None when it is valid."""
    try:
        config_from_dict(apply_overrides(d, overrides))
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def _blame(d: dict, overrides: list[str], message: str, path) -> str:
    """' (from --set k=v, ...)' naming the --set options the error comes from, else ' in <file>'.

    An option is to blame when leaving it out changes the error; when none is alone (a key set twice) but the
    file without any option does not give this error, all of them are.
    """
    culprits = [o for i, o in enumerate(overrides) if _error(d, overrides[:i] + overrides[i + 1:]) != message]
    if not culprits and overrides and _error(d, []) != message:
        culprits = overrides
    if culprits:
        return " (from " + ", ".join(f"--set {o}" for o in culprits) + ")"
    return f" in {path}" if path is not None else ""
