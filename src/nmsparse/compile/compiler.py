"""`compile_model`: a plain model with block (or N:M) sparse weights -> compact file, plan, estimates.

Input: a plain model whose sparse weights are dense tensors with zeros (e.g. after
``nn.sparsify.squash``; a model still carrying sparsify's parametrizations is squashed on a copy).
For each Conv2d/Linear call (traced on an example input) the compiler:

1. detects the weight's format (``layers.detect_format``: zero 8x8 blocks -> block, N:M -> nm,
   else dense);
2. stores it compactly (kept blocks + CSR block indices, N:M values + packed positions, or the
   dense tensor) in one safetensors file with every other tensor of the state dict
   (``formats.io.save``: CRC-checked), with byte counts against dense;
3. plans it on the target (``cost.estimate_layer``): sub-volumes, transfers, compute, estimated
   time sparse and dense. On the ``cpu`` target each sparse layer is also timed dense vs
   block-sparse and falls back to dense when the sparse kernel is slower (``measure=True``).

A model with no sparse layer is an error (``NoSparseLayers``) unless ``allow_dense=True``, which
compiles a dense baseline (every layer stored and planned dense). See ``compile_to_dir`` for the
command-line entry point.
"""

from __future__ import annotations

import copy
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..common.system import check_parent_dirs
from ..formats import compress_block, compress_nm, load, save
from ..formats.block import BlockCompressed
from ..formats.nm import NMCompressed
from ..nn.sparsify import squash
from .cost import LayerEstimate, estimate_cpu, estimate_layer
from .layers import LayerFormat, LayerSpec, NoSparseLayers, block_grid, detect_format, extract_layers
from .profiles import Target, load_target
from .report import markdown_report, write_report
from .runtime import build_executable, decide, layer_input, supports_sparse, to_block_sparse
from .source import resolve_source

__all__ = ["compile_model", "compile_to_dir", "CompiledModel", "LayerPlan", "load_compact", "load_compact_state",
           "COMPACT_FILE", "PLAN_FILE", "REPORT_FILE", "META_KEY"]

COMPACT_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.md"
META_KEY = "nmsparse.compiled"
FORMAT_VERSION = 1



@dataclass
class LayerPlan:
    """One layer of a compiled model: what it is, how it is stored, how it runs and what it costs."""

    spec: LayerSpec
    format: LayerFormat
    estimate: LayerEstimate
    stored_bytes: int
    dense_bytes: int
    decision: str  # "sparse" or "dense": how the layer runs on the target
    weight_key: str
    measured: dict | None = None
    notes: list = field(default_factory=list)
    grid: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self, with_subvolumes: bool = True) -> dict:
        return {"name": self.name, "spec": self.spec.to_dict(), "format": self.format.to_dict(),
                "stored_bytes": self.stored_bytes, "dense_bytes": self.dense_bytes, "decision": self.decision,
                "weight_key": self.weight_key, "measured": self.measured, "notes": list(self.notes),
                "estimate": self.estimate.to_dict(with_subvolumes)}


def _squash_copy(model: nn.Module) -> nn.Module:
    needs = any(parametrize.is_parametrized(m) for m in model.modules()) or any(
        type(m).__name__.startswith("SDGP") for m in model.modules())
    if not needs:
        return model
    return squash(copy.deepcopy(model))


def _stored(obj) -> int:
    if isinstance(obj, (BlockCompressed, NMCompressed)):
        return obj.nbytes
    return obj.numel() * obj.element_size()


class CompiledModel:
    """The compiler's result: per-layer plans, the compact tensors, totals; save() writes them."""

    def __init__(self, model: nn.Module, target: Target, input_shape, layers: list[LayerPlan], compact: dict,
                 block, source: str = "", arch: dict | None = None):
        self.model, self.target, self.input_shape = model, target, tuple(input_shape)
        self.layers, self.compact, self.block, self.source = layers, compact, tuple(block), source
        self.arch = arch  # how to rebuild the architecture from the file alone (load.load_executable)

    # -- summaries ---------------------------------------------------------------------------
    @property
    def sparse_layers(self) -> list[str]:
        """Layers that run block-sparse (decision "sparse" and block format)."""
        return [p.name for p in self.layers if p.decision == "sparse" and p.format.kind == "block"]

    def totals(self) -> dict:
        t = sum(p.estimate.time_s for p in self.layers)
        td = sum(p.estimate.dense_time_s for p in self.layers)
        stored = sum(_stored(v) for v in self.compact.values())
        dense = sum(_dense_nbytes(v) for v in self.compact.values())
        return {"layers": len(self.layers), "sparse_layers": sum(p.format.sparse for p in self.layers),
                "time_s": t, "dense_time_s": td, "speedup": td / t if t > 0 else math.nan,
                "bytes_moved": sum(p.estimate.bytes_moved for p in self.layers),
                "dense_bytes_moved": sum(p.estimate.dense_bytes_moved for p in self.layers),
                "file_bytes": stored, "dense_file_bytes": dense, "file_ratio": stored / dense if dense else math.nan,
                "weight_bytes": sum(p.stored_bytes for p in self.layers),
                "dense_weight_bytes": sum(p.dense_bytes for p in self.layers)}

    def plan_dict(self, with_subvolumes: bool = True) -> dict:
        return {"version": FORMAT_VERSION, "source": self.source, "target": self.target.to_dict(),
                "input_shape": list(self.input_shape), "block": list(self.block), "totals": self.totals(),
                "layers": [p.to_dict(with_subvolumes) for p in self.layers]}

    def report(self) -> str:
        return markdown_report(self)

    def executable(self, backend: str = "auto") -> nn.Module:
        """The model with its block-sparse layers on the CPU kernels (per the plan's decisions)."""
        return build_executable(self.model, self.sparse_layers, backend)

    # -- files -------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        info = {"version": FORMAT_VERSION, "target": self.target.label, "input_shape": list(self.input_shape),
                "block": list(self.block), "source": self.source, "arch": self.arch,
                "layers": {p.name: {"weight": p.weight_key, "format": p.format.kind, "decision": p.decision,
                                    "n": p.format.n, "m": p.format.m, "block_density": p.format.block_density}
                           for p in self.layers}}
        text = json.dumps(info)
        return {META_KEY: text, META_KEY + ".crc32": str(zlib.crc32(text.encode()))}

    def save(self, out_dir, charts: bool = True) -> dict[str, str]:
        """Write the compact model, plan.json, report.md and (with matplotlib) the charts; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"compact": str(out / COMPACT_FILE), "plan": str(out / PLAN_FILE), "report": str(out / REPORT_FILE)}
        save(paths["compact"], self.compact, metadata=self._metadata())
        with open(paths["plan"], "w") as f:
            json.dump(self.plan_dict(), f, indent=1, default=_json_default)
        paths.update(write_report(self, out, charts=charts, name=REPORT_FILE))
        return paths


def _dense_nbytes(obj) -> int:
    if isinstance(obj, (BlockCompressed, NMCompressed)):
        return obj.dense_nbytes
    return obj.numel() * obj.element_size()


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _no_sparse_message(plans: list[tuple[LayerSpec, LayerFormat]], block, where: str) -> str:
    bo, bi = block
    lines = [f"{s.name} ({s.describe()}): {f.reason}" for s, f in plans[:6]]
    more = f" and {len(plans) - 6} more" if len(plans) > 6 else ""
    return (f"no sparse layer in {where}: checked {len(plans)} Conv2d/Linear layers ({'; '.join(lines)}{more}). "
            f"No weight has an all-zero {bo}x{bi} block and none is N:M. Sparsify and squash the model first "
            f"(nmsparse.nn.sparsify with a WeightBlock config, then squash), prune it (CLI: --prune 0.5), or pass "
            f"allow_dense=True (CLI: --allow-dense) to compile it as a dense baseline")


def compile_model(model: nn.Module, target, example_input_shape, *, block=None, allow_dense: bool = False,
                  on_incompatible: str = "error", measure: bool | None = None, backend: str = "auto",
                  timer=None, source: str = "", with_subvolumes: bool = True, arch: dict | None = None) -> CompiledModel:
    """Compile a plain model with block / N:M sparse weights for a target (see module docstring).

    target: a shipped name ("aie2", "gpu", "cpu"), a YAML path, a dict or a profiles.Target.
    example_input_shape: e.g. (1, 3, 224, 224); the plans are for this batch and resolution.
    block: the block size to detect (default: the target's, 8x8).
    on_incompatible: "error" (default) raises IncompatibleLayer for a layer with many zeros whose
    channels the block does not divide; "dense" stores such layers dense.
    measure: time dense vs block-sparse per sparse layer on this CPU and fall back to dense when
    the sparse kernel is slower (default: True on the cpu target, False elsewhere).
    arch: how to rebuild the architecture without this Python object, stored in the compact file
    (set by ``compile_to_dir`` for checkpoints and model names; see ``load.load_executable``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tgt = target if isinstance(target, Target) else load_target(target)
    block = tuple(block or tgt.params["block"])
    if tgt.kind == "cpu" and block != (8, 8):
        raise ValueError(f"block={block}: the cpu target's kernels and cost model run 8x8 blocks only; use "
                         f"block=(8, 8) or an aie2/gpu target")
    measure = (tgt.kind == "cpu") if measure is None else measure
    plain = _squash_copy(model)
    where = source or type(model).__name__
    calls = extract_layers(plain, example_input_shape)
    if not calls:
        raise ValueError(f"{where} has no Conv2d or Linear layer to compile")
    formats = []
    for spec, mod in calls:
        fmt = detect_format(spec.name, mod.weight, block, spec.groups, on_incompatible)
        if fmt.kind == "block" and (spec.notes or not _kernel_ok(mod)):
            fmt.reason += "; runs dense on the CPU (" + ", ".join(spec.notes or ["unsupported conv options"]) + ")"
        formats.append(fmt)
    if not any(f.sparse for f in formats):
        msg = _no_sparse_message([(s, f) for (s, _), f in zip(calls, formats)], block, where)
        if not allow_dense:
            raise NoSparseLayers(msg)
    state = plain.state_dict()
    compact = {k: v.detach().to("cpu") for k, v in state.items()}
    plans = []
    for (spec, mod), fmt in zip(calls, formats):
        w = mod.weight.detach().to("cpu")
        key = _weight_key(state, spec.name)
        grid = None
        if fmt.kind == "block":
            grid = block_grid(w, block)
            obj = compress_block(w, block, grid)
        elif fmt.kind == "nm":
            obj = compress_nm(w, fmt.n, fmt.m, dim=1)
        else:
            obj = w
        if key is not None:
            compact[key] = obj
        est = estimate_layer(spec, fmt, tgt, grid, **({"with_subvolumes": with_subvolumes} if tgt.kind == "aie2" else {}))
        decision = "sparse" if (fmt.sparse and est.time_s < est.dense_time_s) else "dense"
        notes = list(spec.notes) + list(est.notes)
        plans.append(LayerPlan(spec, fmt, est, _stored(obj), w.numel() * w.element_size(), decision,
                               key or "", None, notes, grid))
    if measure:
        _measure(plans, calls, tgt, backend, timer)
    return CompiledModel(plain, tgt, example_input_shape, plans, compact, block, source, arch)


def _kernel_ok(mod) -> bool:
    return supports_sparse(mod)


def _weight_key(state: dict, layer: str) -> str | None:
    key = f"{layer}.weight" if layer else "weight"
    return key if key in state else None


@torch.no_grad()
def _measure(plans, calls, tgt: Target, backend: str, timer) -> None:
    """Per block-sparse layer: time dense vs sparse on this CPU; keep the faster (the fallback)."""
    threads = tgt.params.get("threads") if tgt.kind == "cpu" else None
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for plan, (spec, mod) in zip(plans, calls):
            if plan.format.kind != "block" or not supports_sparse(mod) or spec.notes:
                continue
            dense = copy.deepcopy(mod).to("cpu").float().eval()  # never touch the caller's module
            sparse = to_block_sparse(dense, backend)
            res = decide(dense, sparse, layer_input(spec, g), timer)
            plan.measured = res
            if res["decision"] == "dense":
                plan.notes.append(f"fallback to dense: measured sparse {res['sparse_s'] * 1e3:.3f} ms >= dense "
                                  f"{res['dense_s'] * 1e3:.3f} ms")
            if tgt.kind == "cpu":
                plan.estimate = estimate_cpu(spec, plan.format, tgt.params, plan.grid, decision=res["decision"])
                plan.decision = res["decision"]
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------
# Compact files
# ------------------------------------------------------------------------------------------------

def load_compact(path) -> tuple[dict, dict]:
    """(stored objects by state-dict key, compile info) from a compact file; ValueError naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, COMPACT_FILE)
        if not os.path.isfile(inner):
            raise ValueError(f"{path} is a directory without {COMPACT_FILE}: pass a compact model file or the "
                             f"directory `nmsparse compile --out` wrote")
        path = inner
    try:
        objs, meta = load(path, with_metadata=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"compact model file {path} does not exist") from None
    except ValueError as e:
        raise ValueError(f"compact model file {path} cannot be loaded: {e}") from None
    if META_KEY not in meta:
        raise ValueError(f"{path} is an nmsparse tensor file but not a compiled model (no {META_KEY!r} metadata)")
    if meta.get(META_KEY + ".crc32") != str(zlib.crc32(meta[META_KEY].encode())):
        raise ValueError(f"compact model file {path}: its {META_KEY!r} metadata (layer formats, architecture) fails "
                         f"its CRC-32 check: edited or corrupted; compile the model again")
    try:
        info = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"compact model file {path}: its {META_KEY!r} metadata is not valid JSON ({e})") from None
    if not isinstance(objs, dict):
        raise ValueError(f"compact model file {path} holds a single tensor, not a model's state")
    return objs, info


def load_compact_state(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(dense state dict, info): every stored weight expanded back (kept values bit-exact)."""
    objs, info = load_compact(path)
    state = {k: (v.to_dense() if isinstance(v, (BlockCompressed, NMCompressed)) else v) for k, v in objs.items()}
    return state, info


def compile_to_dir(model_or_path, target_name_or_path, out_dir, *, input_shape=None, prune: float | None = None,
                   array=None, allow_dense: bool = False, on_incompatible: str = "error", charts: bool = True,
                   measure: bool | None = None, backend: str = "auto", seed: int = 0) -> tuple[CompiledModel, dict]:
    """Compile and write ``out_dir``/{model.safetensors, plan.json, report.md, charts}; returns (compiled, paths).

    array: "RxC" or (R, C) overriding an aie2 profile's core array; seed: random weights of a model name.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file: give a directory (it is created if missing)")
    check_parent_dirs(out)
    tgt = load_target(target_name_or_path)
    if array is not None:
        if tgt.kind != "aie2":
            raise ValueError(f"array={array!r} (--array) applies to aie2 targets only; target {tgt.name!r} is "
                             f"{tgt.kind}")
        tgt = load_target(tgt, array=_parse_array(array))
    model, shape, desc, arch = resolve_source(model_or_path, input_shape, prune, seed=seed)
    compiled = compile_model(model, tgt, shape, allow_dense=allow_dense, on_incompatible=on_incompatible,
                             measure=measure, backend=backend, source=desc, arch=arch)
    paths = compiled.save(out_dir, charts=charts)
    return compiled, paths


def _parse_array(array) -> list[int]:
    if isinstance(array, str):
        parts = array.lower().replace(",", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            vals = []
    else:
        vals = list(array)
    if len(vals) != 2 or any((not isinstance(v, int)) or v <= 0 for v in vals):
        raise ValueError(f"array must be ROWSxCOLS such as 4x4, got {array!r}")
    return vals
