"""Save and load compressed tensors (or a name -> tensor dict) as one safetensors file.

Tensors are stored under readable keys (``values``/``indices`` for one object, ``<name>.values``
etc. for a dict entry, ``<name>`` for a plain tensor). The structure, the format parameters and a
CRC-32 per stored tensor go in the safetensors metadata as JSON under the key ``nmsparse``
(itself guarded by a CRC-32 under ``nmsparse.crc32``); other metadata keys are the caller's.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
import zlib

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .block import BlockCompressed
from .nm import NMCompressed

__all__ = ["save", "load", "size_report"]

META_KEY = "nmsparse"
META_CRC_KEY = "nmsparse.crc32"  # CRC-32 of the META_KEY JSON string, so edits to it are caught
VERSION = 1
_PARTS = {"nm": ("values", "indices"), "block": ("values", "crow_indices", "col_indices"),
          "tensor": ("data",)}


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(name: str, obj) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata entry, key -> tensor) for one object stored under ``name``."""
    prefix = f"{name}." if name else ""
    if isinstance(obj, NMCompressed):
        kind, info = "nm", {"n": obj.n, "m": obj.m, "dim": obj.dim}
    elif isinstance(obj, BlockCompressed):
        kind, info = "block", {"block": list(obj.block)}
    elif isinstance(obj, torch.Tensor):
        kind, info = "tensor", {}
    else:
        raise TypeError(
            f"cannot save {name or 'obj'!r} of type {type(obj).__name__}: expected NMCompressed, "
            f"BlockCompressed or torch.Tensor"
        )
    if kind == "tensor":
        tensors = {name or "data": obj}
    else:
        tensors = {prefix + part: getattr(obj, part) for part in _PARTS[kind]}
    info.update(type=kind, shape=list(obj.shape), dtype=_dtype_name(obj.dtype))
    info["tensors"] = dict(zip(_PARTS[kind], tensors))
    return info, tensors


def _prepare(obj, metadata) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if isinstance(obj, dict):
        items, kind = list(obj.items()), "dict"
        for name, _ in items:
            if not isinstance(name, str) or not name:
                raise TypeError(f"dict keys must be non-empty strings, got {name!r}")
    else:
        items, kind = [("", obj)], "single"
    entries, tensors, seen = {}, {}, set()
    for name, value in items:
        info, parts = _describe(name, value)
        for key, t in parts.items():
            if key in tensors:
                raise ValueError(f"entry {name!r} would store tensor key {key!r}, already used by "
                                 f"another entry; rename one of them")
            t = t.detach().to("cpu").contiguous()
            # safetensors refuses tensors sharing memory (e.g. tied weights): copy the repeats.
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[key] = t
        info["crc32"] = {key: _crc(tensors[key]) for key in parts}
        entries[name] = info
    header = {"version": VERSION, "kind": kind, "entries": entries}
    text = json.dumps(header)
    meta = {META_KEY: text, META_CRC_KEY: str(zlib.crc32(text.encode()))}
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must be a dict of str -> str")
        reserved = sorted(set(metadata) & set(meta))
        if reserved:
            raise ValueError(f"metadata keys {reserved} are reserved by nmsparse")
        meta.update(metadata)
    return tensors, meta


def save(path, obj, metadata: dict[str, str] | None = None) -> None:
    """Write obj (NMCompressed, BlockCompressed, tensor, or a dict name -> those) to path atomically.

    The file is written to a temporary file in the same directory and renamed over path, so a
    failure never leaves a partial file at path (a pre-existing file stays as it was).
    """
    path = os.fspath(path)
    tensors, meta = _prepare(obj, metadata)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600): keep the replaced file's mode, else use 0644.
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _dtype_from(name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _build(info: dict, read) -> object:
    kind = info.get("type")
    if kind not in _PARTS:
        raise ValueError(f"unknown entry type {kind!r}")
    keys = info["tensors"]
    if set(keys) != set(_PARTS[kind]):
        raise ValueError(f"entry of type {kind!r} must list tensors {_PARTS[kind]}, got {list(keys)}")
    parts = {part: read(keys[part], info["crc32"][keys[part]]) for part in _PARTS[kind]}
    shape, dtype = torch.Size(info["shape"]), _dtype_from(info["dtype"])
    first = parts[_PARTS[kind][0]]
    if first.dtype != dtype:
        raise ValueError(f"stored dtype {first.dtype} differs from recorded dtype {dtype}")
    if kind == "tensor":
        if first.shape != shape:
            raise ValueError(f"stored shape {tuple(first.shape)} differs from recorded {tuple(shape)}")
        return first
    if kind == "nm":
        obj = NMCompressed(parts["values"], parts["indices"], info["n"], info["m"], info["dim"], shape)
        obj._check_positions()
        return obj
    obj = BlockCompressed(parts["values"], parts["crow_indices"], parts["col_indices"], shape,
                          tuple(info["block"]))
    obj._check_index_values()
    return obj


def load(path, device: str | torch.device = "cpu", *, with_metadata: bool = False):
    """Read a file written by ``save``; returns the same structure (and, optionally, user metadata).

    Raises FileNotFoundError for a missing file and ValueError naming the path for a corrupted or
    foreign file (checksums are verified, indices validated).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            stored = set(f.keys())

            def read(key, crc):
                if key not in stored:
                    raise ValueError(f"tensor {key!r} is missing")
                t = f.get_tensor(key)
                if _crc(t.contiguous()) != crc:
                    raise ValueError(f"tensor {key!r} fails its CRC-32 check (corrupted data)")
                return t

            if META_KEY not in meta:
                raise ValueError(f"no {META_KEY!r} metadata: not written by nmsparse.formats.save")
            if meta.get(META_CRC_KEY) != str(zlib.crc32(meta[META_KEY].encode())):
                raise ValueError(f"the {META_KEY!r} metadata fails its CRC-32 check (corrupted)")
            header = json.loads(meta[META_KEY])
            if not isinstance(header, dict) or header.get("version") != VERSION:
                raise ValueError(f"unsupported nmsparse format version in {header!r:.80}")
            result = {}
            for name, info in header["entries"].items():
                try:
                    result[name] = _build(info, read)
                except (ValueError, TypeError, KeyError, RuntimeError) as e:
                    raise ValueError(f"entry {name!r}: {e}") from e
            if header["kind"] == "single":
                if set(result) != {""}:
                    raise ValueError(f"a single-object file holds entries {list(result)}")
                result = result[""]
            elif header["kind"] != "dict":
                raise ValueError(f"unknown kind {header['kind']!r}")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: invalid nmsparse file: {e}") from e
    if device is not None and torch.device(device) != torch.device("cpu"):
        result = {k: v.to(device) for k, v in result.items()} if isinstance(result, dict) \
            else result.to(device)
    user = {k: v for k, v in meta.items() if k not in (META_KEY, META_CRC_KEY)}
    return (result, user) if with_metadata else result


def _row(obj) -> dict:
    if isinstance(obj, NMCompressed):
        values = obj.values.numel() * obj.values.element_size()
        meta, dense = obj.indices.numel(), obj.dense_nbytes
    elif isinstance(obj, BlockCompressed):
        values = obj.values.numel() * obj.values.element_size()
        meta, dense = obj.nbytes - values, obj.dense_nbytes
    elif isinstance(obj, torch.Tensor):
        values = dense = obj.numel() * obj.element_size()
        meta = 0
    else:
        raise TypeError(f"size_report takes NMCompressed, BlockCompressed, a tensor or a dict of "
                        f"them, got {type(obj).__name__}")
    return _totals(values, meta, dense)


def _totals(values: int, meta: int, dense: int) -> dict:
    total = values + meta
    return {"values_bytes": values, "metadata_bytes": meta, "total_bytes": total,
            "dense_bytes": dense, "ratio": total / dense if dense else math.nan}


def size_report(obj) -> dict:
    """In-memory sizes (values, index metadata, total, dense, total/dense) of one object or a dict.

    For a dict the totals are summed and per-entry rows are under ``"entries"``. File header and
    JSON metadata are not counted.
    """
    if not isinstance(obj, dict):
        return _row(obj)
    rows = {name: _row(v) for name, v in obj.items()}
    sums = [sum(r[k] for r in rows.values()) for k in ("values_bytes", "metadata_bytes", "dense_bytes")]
    return {**_totals(*sums), "entries": rows}
