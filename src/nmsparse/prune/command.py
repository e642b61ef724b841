"""`nmsparse prune CHECKPOINT --pattern ... --out FILE [--method ...]`: prune a trained checkpoint one-shot
(AdaPrune by default; magnitude, Wanda or SparseGPT), with the dense and magnitude baselines and times."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..common.system import check_parent_dirs, resolve_device
from ..data import (NUM_CLASSES, STATS, TEXT_DATASETS, DataConfig, TensorLoader, build_loaders, calibration_blocks,
                    load_dataset, normalize_uint8, text_corpus, whole_split)
from ..models import autocast_dtype, evaluate, load_model, save_checkpoint
from ..nn.sparsify import squash
from .adaprune import adaprune, check_settings, recalibrate_bn
from .layerwise import check_nm_pattern
from .magnitude import PATTERNS, check_pattern_fits, magnitude_prune, parse_pattern, prunable_layers
from .sparsegpt import check_sparsegpt_settings, sparsegpt_prune
from .wanda import wanda_prune


def calibration_set(d: DataConfig, dev, n: int, seed: int = 0, channels_last: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised, un-augmented training images of data config `d`: the first n of a seeded shuffle, at most
    ceil(n / classes) per class (so n = classes gives one image per class). For a text corpus: n random
    training blocks of the config's block size, as (inputs, next characters)."""
    if d.name in TEXT_DATASETS:
        blocks = calibration_blocks(text_corpus(d), n, d.block_size + 1, seed).to(dev)
        return blocks[:, :-1], blocks[:, 1:]
    if d.name == "imagefolder":
        train_loader, _ = build_loaders(d, dev, seed=seed)
        xs, ys, got = [], [], 0
        for x, y in train_loader:
            xs.append(x), ys.append(y)
            got += len(y)
            if got >= n:
                break
        x, y = torch.cat(xs)[:n].to(dev), torch.cat(ys)[:n].to(dev)
        return (normalize_uint8(x, dev) if x.dtype == torch.uint8 else x), y
    xtr, ytr = load_dataset(d.name, d.root, "train")
    classes = NUM_CLASSES[d.name]
    quota = -(-n // classes)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
    counts: dict[int, int] = {}
    picked: list[int] = []
    for i in perm.tolist():
        c = int(ytr[i])
        if counts.get(c, 0) < quota:
            counts[c] = counts.get(c, 0) + 1
            picked.append(i)
            if len(picked) == n:
                break
    idx = torch.tensor(picked, dtype=torch.long)
    mean, std = STATS[d.name]
    loader = TensorLoader(xtr[idx], ytr[idx], max(len(idx), 1), mean, std, shuffle=False, device=dev,
                          channels_last=channels_last)
    x, y = next(iter(loader))
    return x, y


def _check_out(out: str | Path) -> Path:
    """The output file's path, refused before any work when it cannot be written as a file."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file name, e.g. {out / 'pruned.pt'}")
    check_parent_dirs(out)
    return out


METHODS = ("adaprune", "magnitude", "wanda", "sparsegpt")
_NAMES = {"adaprune": "AdaPrune", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
CALIB_LAYERWISE = 128  # default calibration samples for Wanda and SparseGPT (the papers use 128 sequences)


@dataclass(frozen=True)
class Metric:
    """The one number `nmsparse prune` reports per model: results go to ``res[f"{label}_{key}"]``."""

    key: str
    name: str
    unit: str
    fn: Callable[[nn.Module], float]

    def format(self, value: float) -> str:
        return f"{value:.2f}%" if self.unit == "%" else f"{value:.4f}{self.unit}"


def checkpoint_metric(cfg: dict, dev) -> Metric:
    """The metric of a checkpoint's model on its held-out data: test accuracy (%) for the image classifiers
    `nmsparse train` writes, the loss on the whole validation split (nats/char) for a language model."""
    data = DataConfig(**cfg["data"])
    _, test_loader = build_loaders(data, dev, channels_last=cfg.get("channels_last", False))
    amp = autocast_dtype(cfg.get("amp", "auto"), dev)
    if data.name in TEXT_DATASETS:
        full = whole_split(test_loader)
        return Metric("loss", "validation loss", " nats/char", lambda m: evaluate(m, full, dev, amp)["val_loss"])
    return Metric("acc", "test accuracy", "%",
                  lambda m: evaluate(m, test_loader, dev, amp, cfg.get("tta_flip", False))["test_acc"])


def _check_method(method, magnitude_only: bool) -> str:
    if method is None:
        return "magnitude" if magnitude_only else "adaprune"
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if magnitude_only and method != "magnitude":
        raise ValueError(f"--magnitude-only means --method magnitude, not {method}: pass one of them")
    return method


def prune_checkpoint(checkpoint: str | Path, pattern: str, sparsity: float | None = None, calib: int | None = None,
                     iters: int = 1000, out: str | Path | None = None, *, batch: int = 50, absorb_mean: bool = True,
                     magnitude_only: bool = False, method: str | None = None, blocksize: int = 128,
                     percdamp: float = 0.01, device: str = "auto", seed: int = 0, progress: bool = False,
                     log=None) -> dict:
    """Dense, magnitude-only and ``method``'s test accuracy (%) of a `nmsparse train` checkpoint, with times.

    ``method``: "adaprune" (the default), "magnitude" (as ``magnitude_only``), "wanda" or "sparsegpt" (N:M and
    N:M-T patterns; ``blocksize`` and ``percdamp`` are SparseGPT's). Saves the pruned model (the method's; for
    AdaPrune with its batch-norm recalibration, for Wanda and SparseGPT without) to ``out`` as a training
    checkpoint of plain modules, which `nmsparse eval` and `nmsparse compile` read like any other. Also
    returns magnitude_bn_acc (magnitude masks plus the batch-norm recalibration; for Wanda and SparseGPT also
    ``<method>_bn_acc``), ``<method>_seconds`` and per-layer reports. Calibration images default to one per
    class (magnitude, AdaPrune) or 128 (Wanda, SparseGPT).
    """
    # Everything that can be refused is refused before the model is loaded and pruned.
    p = parse_pattern(pattern, sparsity)
    method = _check_method(method, magnitude_only)
    check_settings(iters, batch, "--")
    if method in ("wanda", "sparsegpt"):
        check_nm_pattern(p, method)
        if method == "sparsegpt":
            check_sparsegpt_settings(blocksize, percdamp, p.m)
    if calib is not None and calib < 1:
        raise ValueError(f"--calib must be >= 1 (calibration images), got {calib}; for no reconstruction "
                         f"use --magnitude-only")
    out = _check_out(out) if out is not None else None
    model, state = load_model(checkpoint)
    cfg = state["config"]
    dev = resolve_device(device)
    data = DataConfig(**cfg["data"])
    metric = checkpoint_metric(cfg, dev)
    model = squash(model).to(dev).eval()
    check_pattern_fits(prunable_layers(model), p)
    layerwise = method in ("wanda", "sparsegpt") or data.name in TEXT_DATASETS
    n = calib if calib is not None else CALIB_LAYERWISE if layerwise else NUM_CLASSES[data.name]
    calib_x, _ = calibration_set(data, dev, n, seed, cfg.get("channels_last", False))
    mk = metric.key
    res = {"pattern": str(p), "calib": len(calib_x), "calib_asked": n, "iters": iters, "method": method,
           "metric": {"key": mk, "name": metric.name, "unit": metric.unit}, f"dense_{mk}": metric.fn(model)}
    t0 = time.perf_counter()
    mag = magnitude_prune(copy.deepcopy(model), p)
    res["magnitude_seconds"] = time.perf_counter() - t0
    res[f"magnitude_{mk}"] = metric.fn(mag)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn:  # without batch norms the recalibrated model is the magnitude one
        res[f"magnitude_bn_{mk}"] = metric.fn(recalibrate_bn(copy.deepcopy(mag) if method == "magnitude" else mag,
                                                             calib_x))
    final = mag
    if method != "magnitude":
        del mag
        t0 = time.perf_counter()
        if method == "adaprune":
            report: list = []
            adaprune(model, calib_x, p, iters=iters, batch=batch, absorb_mean=absorb_mean, bn_recalib_x=calib_x,
                     progress=progress, seed=seed, report=report)
        elif method == "wanda":
            report = wanda_prune(model, calib_x, p).layers
        else:
            report = sparsegpt_prune(model, calib_x, p, blocksize=blocksize, percdamp=percdamp).layers
        res[f"{method}_seconds"] = time.perf_counter() - t0
        res[f"{method}_{mk}"] = metric.fn(model)
        if method != "adaprune" and has_bn:
            res[f"{method}_bn_{mk}"] = metric.fn(recalibrate_bn(copy.deepcopy(model), calib_x))
        res["layers"] = report
        final = model
    if out is not None:
        saved_cfg = dict(cfg, sparsity=None, device="auto", name=f"{cfg['name']} pruned {p} ({res['method']})")
        save_checkpoint(out, {"config": saved_cfg, "model": {k: v.detach().cpu() for k, v in final.state_dict().items()},
                              "model_record": state.get("model_record"),
                              "epoch": state.get("epoch"), "pruned": {k: v for k, v in res.items() if k != "layers"},
                              "source": str(checkpoint)})
        res["out"] = str(out)
    if log is not None:
        log(format_result(res))
    return res


def _layer_line(r: dict) -> str:
    if "mse_final" in r:  # AdaPrune
        return (f"    {r['name']}: MSE magnitude {r['mse_magnitude']:.4g} -> absorbed {r['mse_init']:.4g}"
                f" -> AdaPrune {r['mse_final']:.4g}")
    extra = f", relative calibration error {r['rel_error']:.4g}" if "rel_error" in r else ""
    return f"    {r['name']}: {r['rows']} calibration rows, {r['seconds']:.2f} s{extra}"


def format_result(res: dict) -> str:
    meta = res.get("metric", {"key": "acc", "unit": "%"})
    k = meta["key"]
    fmt = Metric(k, meta.get("name", k), meta["unit"], lambda m: 0.0).format
    method = res.get("method", "adaprune")
    calib = f"calib {res['calib']}"
    if res.get("calib_asked", res["calib"]) != res["calib"]:
        calib += f" (asked {res['calib_asked']}: all the training set offers)"
    head = f"pattern {res['pattern']}, {calib}, " + {
        "magnitude": "magnitude only",
        "adaprune": f"iters {res['iters']} ({res.get('adaprune_seconds', 0):.1f} s)"}.get(method, _NAMES[method])
    lines = [head, f"  {'dense':16} {fmt(res[f'dense_{k}'])}"]
    rows = [("magnitude only", "magnitude", "magnitude_seconds"), ("magnitude + BN", "magnitude_bn", None)]
    if method != "magnitude":
        rows += [(_NAMES[method], method, f"{method}_seconds"), (f"{_NAMES[method]} + BN", f"{method}_bn", None)]
    for label, key, secs in rows:
        if f"{key}_{k}" in res:
            took = f"   ({res[secs]:.2f} s)" if secs in res else ""
            lines.append(f"  {label:16} {fmt(res[f'{key}_{k}'])}{took}")
    lines += [_layer_line(r) for r in res.get("layers", [])]
    if res.get("out"):
        what = "magnitude-pruned" if method == "magnitude" else _NAMES[method]
        lines.append(f"  saved the {what} model to {res['out']} (nmsparse eval / nmsparse compile read it)")
    return "\n".join(lines)


def add_prune_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint.pt written by nmsparse train")
    parser.add_argument("--pattern", required=True,
                        help=f"{', '.join(PATTERNS)}, or any N:M, N:M-T (transposable) or blockRxC")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of blocks zeroed, block patterns only (default 0.5)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="adaprune (default), magnitude, wanda or sparsegpt (N:M and N:M-T patterns only); "
                             "dense and magnitude results are always reported")
    parser.add_argument("--calib", type=int, default=None,
                        help=f"calibration images (default: one per class; {CALIB_LAYERWISE} for wanda and sparsegpt)")
    parser.add_argument("--iters", type=int, default=1000, help="Adam steps per layer (default 1000)")
    parser.add_argument("--batch", type=int, default=50, help="cached samples per Adam step (default 50)")
    parser.add_argument("--no-absorb-mean", dest="absorb_mean", action="store_false",
                        help="do not fold the pruned weights' mean output into the bias before reconstructing")
    parser.add_argument("--magnitude-only", action="store_true",
                        help="as --method magnitude: save the magnitude-pruned model (accuracies are still reported)")
    parser.add_argument("--blocksize", type=int, default=128,
                        help="sparsegpt: columns per lazy update, a multiple of M (default 128)")
    parser.add_argument("--percdamp", type=float, default=0.01,
                        help="sparsegpt: Hessian dampening, a fraction of its mean diagonal (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample and Adam batch order (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, help="file for the pruned model (a checkpoint of plain modules)")


def prune_command(args) -> int:
    try:
        prune_checkpoint(args.checkpoint, args.pattern, args.sparsity, args.calib, args.iters, args.out,
                         batch=args.batch, absorb_mean=args.absorb_mean, magnitude_only=args.magnitude_only,
                         method=args.method, blocksize=args.blocksize, percdamp=args.percdamp,
                         device=args.device, seed=args.seed, log=print)
    except (ValueError, OSError) as e:
        print(f"nmsparse prune: error: {e}", file=sys.stderr)
        return 2
    return 0
