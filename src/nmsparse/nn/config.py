"""The sparsity config: which weight pattern and which data-gradient pruning, validated from dicts/YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from ..common.text import check_keys, did_you_mean
from .sdgp import SDGP_METHODS, check_sdgp_settings
from .sparse_cores import check_kernel
from .weight import check_block_settings, check_nm_settings


def _from_dict(cls, d: dict, where: str):
    check_keys(d, [f.name for f in fields(cls)], where)
    return cls(**d)


def _checked(where: str, check, *args):
    """check(*args) with `where` (e.g. "sparsity.weight") leading any error message."""
    try:
        return check(*args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


@dataclass
class GradSparsity:
    """SDGP: prune the output gradient N:M along channels for the input-gradient product."""

    n: int = 2
    m: int = 4
    method: str = "rescale"  # "magnitude" | "random" | "rescale" | "random-unbiased" | "mvue" | "tile24" (2:4 only)
    layers: str = "conv"  # "conv" (the reference: convs with > 3 input channels) | "conv+linear"
    seed: int = 0

    def __post_init__(self):
        if self.method not in SDGP_METHODS:
            raise ValueError(f"grad.method must be one of {SDGP_METHODS}, got {self.method!r}"
                             f"{did_you_mean(self.method, SDGP_METHODS)}")
        if self.layers not in ("conv", "conv+linear"):
            raise ValueError(f"grad.layers must be 'conv' or 'conv+linear', got {self.layers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"grad.seed must be an int, got {self.seed!r}")
        _checked("grad", check_sdgp_settings, self.n, self.m, self.method)


@dataclass
class WeightNM:
    """N:M weights: SR-STE (default), plain STE or a fixed mask; optionally transposable."""

    n: int = 2
    m: int = 4
    method: str = "srste"  # "srste" | "ste" | "fixed"
    decay: float = 2e-4
    transposable: bool = False
    mask_method: str = "exact"  # transposable solver: "exact" | "greedy"
    recompute_every: int = 40
    kernel: str = "dense"  # "dense" | "auto": 2:4 Linears on sparse tensor cores where faster (sparse_cores.py)

    def __post_init__(self):
        _checked("sparsity.weight", check_nm_settings, self.n, self.m, self.method, self.decay, self.transposable,
                 self.mask_method, self.recompute_every)
        check_kernel(self.kernel, self.n, self.m)


@dataclass
class WeightBlock:
    """Block weights (8x8 by default), chosen once or on a gradual schedule."""

    block: tuple = (8, 8)
    sparsity: float = 0.5
    score: str = "l2"
    schedule: str = "oneshot"  # "oneshot" | "gradual"
    start_step: int = 0
    end_step: int | None = None
    every: int = 100
    power: float = 3

    def __post_init__(self):
        if not isinstance(self.block, (tuple, list)):
            raise TypeError(f"weight.block must be a pair such as [8, 8], got {self.block!r}")
        self.block = tuple(self.block)
        _checked("sparsity.weight", check_block_settings, self.block, self.sparsity, self.score, self.schedule,
                 self.start_step, self.end_step, self.every, self.power)


# The YAML names of the weight configs (sparsity.weight.kind); nn.registry maps each config type to its layer handler.
WEIGHT_KINDS = {"nm": WeightNM, "block": WeightBlock}


@dataclass
class SparsityConfig:
    """Everything `sparsify` needs. Build from Python or from a dict (YAML) with `from_dict`."""

    weight: WeightNM | WeightBlock | None = None
    grad: GradSparsity | None = None
    include: list[str] | None = None  # fnmatch patterns of module names; replaces the default filter
    exclude: list[str] = field(default_factory=list)  # module-name patterns kept dense
    on_incompatible: str = "error"  # "error" | "skip" (with a warning)

    def __post_init__(self):
        # Plain dicts are accepted where the dataclasses are expected (as in from_dict).
        if isinstance(self.weight, dict):
            self.weight = SparsityConfig.from_dict({"weight": self.weight}).weight
        if isinstance(self.grad, dict):
            self.grad = _from_dict(GradSparsity, self.grad, "sparsity.grad")
        if self.weight is not None and not isinstance(self.weight, (WeightNM, WeightBlock)):
            raise TypeError(f"sparsity.weight must be a WeightNM, a WeightBlock or a dict, got "
                            f"{type(self.weight).__name__}")
        if self.grad is not None and not isinstance(self.grad, GradSparsity):
            raise TypeError(f"sparsity.grad must be a GradSparsity or a dict, got {type(self.grad).__name__}")
        # A single pattern string would otherwise be matched one character at a time.
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (list, tuple))
                                      or not all(isinstance(v, str) for v in value)):
                raise TypeError(f"sparsity.{key} must be a module-name pattern or a list of them (fnmatch, e.g. "
                                f"'features.*'), got {value!r}")
            if value is not None:
                setattr(self, key, list(value))
        if self.on_incompatible not in ("error", "skip"):
            raise ValueError(f"on_incompatible must be 'error' or 'skip', got {self.on_incompatible!r}")
        if self.weight is None and self.grad is None:
            raise ValueError("SparsityConfig needs weight=... and/or grad=...; both are None")

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityConfig":
        """From e.g. {"weight": {"kind": "nm", "n": 2, "m": 4}, "grad": {"method": "rescale"}}."""
        check_keys(d, [f.name for f in fields(cls)], "sparsity")
        d = dict(d)
        if d.get("weight") is not None:
            w = dict(d["weight"])
            kind = w.pop("kind", "nm")
            kinds = WEIGHT_KINDS
            if kind not in kinds:
                raise ValueError(f"sparsity.weight.kind must be 'nm' or 'block', got {kind!r}")
            d["weight"] = _from_dict(kinds[kind], w, "sparsity.weight")
        if d.get("grad") is not None:
            d["grad"] = _from_dict(GradSparsity, d["grad"], "sparsity.grad")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.weight, WeightBlock):
            d["weight"] = {"kind": "block", **d["weight"], "block": list(self.weight.block)}
        elif self.weight is not None:
            d["weight"] = {"kind": "nm", **d["weight"]}
        return d
