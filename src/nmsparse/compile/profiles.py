"""Hardware profiles (YAML) for the compiler's cost models: loading, validation, listing.

A profile is a YAML mapping with ``name`` and ``kind`` (``aie2``, ``gpu`` or ``cpu``) and the keys
that kind's cost model needs (``SCHEMAS``). The shipped profiles are in ``targets/``; a user may
pass the path of their own file. Every error names the file and the key.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["Target", "load_target", "list_targets", "TARGET_DIR", "SCHEMAS", "ProfileError"]

TARGET_DIR = Path(__file__).resolve().parent / "targets"


class ProfileError(ValueError):
    """A hardware profile that cannot be used (unknown name, unreadable, missing or mistyped key)."""


# Key checkers: each returns an error text or None.
def _pos_number(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return None if ok else "a number > 0"


def _nonneg_number(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return None if ok else "a number >= 0"


def _fraction(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "a number in (0, 1]"


def _pos_int(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else "an integer > 0"


def _bool(v):
    return None if isinstance(v, bool) else "true or false"


def _str(v):
    return None if isinstance(v, str) and v else "a non-empty string"


def _int_pair(v):
    ok = (isinstance(v, (list, tuple)) and len(v) == 2
          and all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in v))
    return None if ok else "a list of two integers > 0, e.g. [8, 8]"


def _density_map(v):
    if not isinstance(v, dict) or not v:
        return "a mapping density -> number, e.g. {0.25: 120.0, 0.5: 130.0}"
    for k, x in v.items():
        if _fraction(k) or _pos_number(x):
            return "a mapping density (0, 1] -> number > 0"
    return None


def _mapping(schema):
    def check(v):
        if not isinstance(v, dict):
            return "a mapping with keys " + ", ".join(schema)
        return None
    check.schema = schema
    return check


_COMMON = {"name": (_str, True), "kind": (_str, True), "block": (_int_pair, True),
           "description": (_str, False), "source": (_str, False)}

SCHEMAS = {
    "aie2": {
        **_COMMON,
        "array": (_int_pair, True),
        "clock_ghz": (_pos_number, True),
        "macs_per_cycle": (_pos_int, True),
        "dtype_bytes": (_pos_int, True),
        "acc_bytes": (_pos_int, True),
        "index_bytes": (_pos_int, True),
        "core_memory_kib": (_pos_number, True),
        "memtile_kib": (_pos_number, True),
        "ddr_channels_per_column": (_pos_number, True),
        "ddr_load_gbps": (_pos_number, True),
        "ddr_write_gbps": (_pos_number, True),
        "core_load_gbps": (_pos_number, True),
        "core_write_gbps": (_pos_number, True),
        "double_buffer": (_bool, True),
        "reuse_dense_tiling": (_bool, False),
    },
    "gpu": {
        **_COMMON,
        "device": (_str, True),
        "dtype_bytes": (_pos_int, True),
        "dense_tflops": (_pos_number, True),
        "sparse_24_tflops": (_pos_number, True),
        "memory_gbps": (_pos_number, True),
        "efficiency": (_fraction, True),
        "sparse_efficiency": (_fraction, True),
        "block_sparse_efficiency": (_fraction, True),
        "launch_overhead_us": (_nonneg_number, True),
        "sparse_overhead_us": (_nonneg_number, True),
    },
    "cpu": {
        **_COMMON,
        "machine": (_str, True),
        "threads": (_pos_int, True),
        "measured": (_str, False),
        "memory_gbps": (_pos_number, True),
        "dense": (_mapping({"overhead_us": _nonneg_number,
                            **{f"{k}_{u}": _pos_number for k in ("conv1x1", "convkxk", "linear", "gemv")
                               for u in ("gmacs", "weight_gbps")}, "gemv_dram_gbps": _pos_number}), True),
        "sparse": (_mapping({"backend": _str, "overhead_us": _nonneg_number,
                             **{f"{u}_{k}": _pos_number for k in ("1x1", "kxk") for u in ("gmacs", "gblocks")},
                             "copy_gfloats": _pos_number, "fetch_gbps": _pos_number,
                             "store_gfloats": _pos_number,
                             "l2_miss_gbps": _pos_number, "gemv_gmacs": _pos_number,
                             "gemv_weight_gbps": _pos_number, "gemv_dram_gbps": _pos_number}), True),
        "cache": (_mapping({"l2_kib": _pos_number, "llc_kib": _pos_number}), False),
        "sparse_gmacs_by_density": (_density_map, False),
        "dense_gemm_gflops": (_pos_number, False),
        "fit_error_median": (lambda v: None if isinstance(v, dict) else "a mapping", False),
        "fit_error_max": (lambda v: None if isinstance(v, dict) else "a mapping", False),
    },
}


@dataclass
class Target:
    """A validated hardware profile: ``params`` holds the YAML keys; ``source`` the file it came from."""

    name: str
    kind: str
    params: dict
    source: str = "<memory>"
    overrides: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.params[key]

    def get(self, key, default=None):
        return self.params.get(key, default)

    @property
    def label(self) -> str:
        if self.kind == "aie2":
            r, c = self.params["array"]
            return f"{self.name} ({r}x{c})"
        return self.name

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, **copy.deepcopy(self.params)}


def list_targets() -> list[str]:
    """Names of the shipped profiles (the YAML files in ``targets/``)."""
    return sorted(p.stem for p in TARGET_DIR.glob("*.yaml"))


def _validate(params: dict, where: str) -> None:
    kind = params.get("kind")
    if kind not in SCHEMAS:
        raise ProfileError(f"profile {where}: key 'kind' must be one of {sorted(SCHEMAS)}, got {kind!r}")
    schema = SCHEMAS[kind]
    missing = [k for k, (_, required) in schema.items() if required and k not in params]
    if missing:
        article = "an" if kind == "aie2" else "a"
        raise ProfileError(f"profile {where}: missing key {missing[0]!r} ({article} {kind} profile needs "
                           f"{', '.join(k for k, (_, r) in schema.items() if r)})")
    for key, value in params.items():
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ProfileError(f"profile {where}: unknown key {key!r} for kind {kind!r}{hint}")
        check, _ = schema[key]
        want = check(value)
        if want:
            raise ProfileError(f"profile {where}: key {key!r} must be {want}, got {value!r} "
                               f"({type(value).__name__})")
        sub = getattr(check, "schema", None)
        if sub:
            for k2, check2 in sub.items():
                if k2 not in value:
                    raise ProfileError(f"profile {where}: missing key '{key}.{k2}'")
                if k2 == "backend":
                    continue
                want2 = check2(value[k2])
                if want2:
                    raise ProfileError(f"profile {where}: key '{key}.{k2}' must be {want2}, got "
                                       f"{value[k2]!r} ({type(value[k2]).__name__})")
            extra = sorted(set(value) - set(sub))
            if extra:
                raise ProfileError(f"profile {where}: unknown key '{key}.{extra[0]}'")
    # The cpu cost model (cost.kernel_work) and the native kernel (kernels.block_cpu.BLOCK) are
    # written for 8x8 blocks; another size would be estimated with 8x8 work counts and run nowhere.
    if kind == "cpu" and list(params["block"]) != [8, 8]:
        raise ProfileError(f"profile {where}: key 'block' must be [8, 8] for a cpu profile, got "
                           f"{list(params['block'])}: the cpu kernels run 8x8 blocks only (use an aie2 "
                           f"or gpu profile to estimate other block sizes)")


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"profile {path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ProfileError(f"profile {path} is not a text file (not UTF-8): expected a YAML profile such as "
                           f"the shipped ones (nmsparse/compile/targets/*.yaml)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"profile {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path}: expected a YAML mapping of keys, got {type(data).__name__}")
    return data


def load_target(target, **overrides) -> Target:
    """A Target from a shipped name (``aie2``, ``gpu``, ``cpu``), a YAML path, a dict or a Target.

    ``overrides`` replace keys after loading (e.g. ``array=(2, 2)`` for aie2) and are validated
    like the file's own keys.
    """
    if isinstance(target, Target):
        params, where = copy.deepcopy(target.params), target.source
        params.update(name=target.name, kind=target.kind)
    elif isinstance(target, dict):
        params, where = copy.deepcopy(target), "<dict>"
    elif isinstance(target, (str, os.PathLike)):
        text = os.fspath(target)
        path = Path(text)
        looks_like_path = text.endswith((".yaml", ".yml")) or os.sep in text or path.exists()
        if looks_like_path:
            if not path.exists():
                raise ProfileError(f"profile file {path} does not exist (known targets: "
                                   f"{', '.join(list_targets())})")
            params, where = _read(path), str(path)
        else:
            known = list_targets()
            if text not in known:
                close = difflib.get_close_matches(text, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "."
                raise ProfileError(f"unknown target {text!r}{hint} Known targets: {', '.join(known)} "
                                   f"(or pass the path of a YAML profile)")
            path = TARGET_DIR / f"{text}.yaml"
            params, where = _read(path), str(path)
    else:
        raise ProfileError(f"target must be a name, a YAML path, a dict or a Target, got {type(target).__name__}")
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items() if v is not None}
    params.update(clean)
    _validate(params, where)
    return Target(name=params.pop("name"), kind=params.pop("kind"), params=params, source=where,
                  overrides=clean)
