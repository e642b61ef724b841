"""The sparsity config: which weight pattern and which data-gradient pruning, validated from dicts/YAML."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields


def _check_keys(cls, d: dict, where: str) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a mapping, got {type(d).__name__}")
    valid = [f.name for f in fields(cls)]
    for key in d:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ValueError(f"unknown key {where}.{key}{hint} Valid keys: {', '.join(valid)}")


def _from_dict(cls, d: dict, where: str):
    _check_keys(cls, d, where)
    return cls(**d)


@dataclass
class GradSparsity:
    """SDGP: prune the output gradient N:M along channels for the input-gradient product."""

    n: int = 2
    m: int = 4
    method: str = "rescale"  # "magnitude" | "random" | "rescale"
    layers: str = "conv"  # "conv" (the reference: convs with > 3 input channels) | "conv+linear"
    seed: int = 0

    def __post_init__(self):
        from .sdgp import SDGP_METHODS

        if self.method not in SDGP_METHODS:
            raise ValueError(f"grad.method must be one of {SDGP_METHODS}, got {self.method!r}")
        if self.layers not in ("conv", "conv+linear"):
            raise ValueError(f"grad.layers must be 'conv' or 'conv+linear', got {self.layers!r}")
        _check_nm(self.n, self.m, "grad")


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

    def __post_init__(self):
        _check_nm(self.n, self.m, "weight")


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
        self.block = tuple(self.block)


@dataclass
class SparsityConfig:
    """Everything `sparsify` needs. Build from Python or from a dict (YAML) with `from_dict`."""

    weight: WeightNM | WeightBlock | None = None
    grad: GradSparsity | None = None
    include: list[str] | None = None  # fnmatch patterns of module names; replaces the default filter
    exclude: list[str] = field(default_factory=list)  # module-name patterns kept dense
    on_incompatible: str = "error"  # "error" | "skip" (with a warning)

    def __post_init__(self):
        if self.on_incompatible not in ("error", "skip"):
            raise ValueError(f"on_incompatible must be 'error' or 'skip', got {self.on_incompatible!r}")
        if self.weight is None and self.grad is None:
            raise ValueError("SparsityConfig needs weight=... and/or grad=...; both are None")

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityConfig":
        """From e.g. {"weight": {"kind": "nm", "n": 2, "m": 4}, "grad": {"method": "rescale"}}."""
        _check_keys(cls, d, "sparsity")
        d = dict(d)
        if d.get("weight") is not None:
            w = dict(d["weight"])
            kind = w.pop("kind", "nm")
            kinds = {"nm": WeightNM, "block": WeightBlock}
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


def _check_nm(n, m, where: str) -> None:
    from ..patterns._checks import check_nm

    try:
        check_nm(n, m)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
