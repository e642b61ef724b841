"""`nmsparse prune CHECKPOINT --pattern ... --out FILE`: AdaPrune a trained checkpoint, with the baselines."""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch

from .adaprune import (PATTERNS, _check_pattern_fits, adaprune, magnitude_prune, parse_pattern, prunable_layers,
                       recalibrate_bn)


def calibration_set(cfg, dev, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised, un-augmented training images: the first n of a seeded shuffle, at most
    ceil(n / classes) per class (so n = classes gives one image per class)."""
    from ..train.data import NUM_CLASSES, STATS, TensorLoader, load_dataset

    d = cfg.data
    if d.name == "imagefolder":
        from ..train.loop import _normalize_uint8, build_loaders

        train_loader, _ = build_loaders(cfg, dev)
        xs, ys, got = [], [], 0
        for x, y in train_loader:
            xs.append(x), ys.append(y)
            got += len(y)
            if got >= n:
                break
        x, y = torch.cat(xs)[:n].to(dev), torch.cat(ys)[:n].to(dev)
        return (_normalize_uint8(x, dev) if x.dtype == torch.uint8 else x), y
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
                          channels_last=cfg.channels_last)
    x, y = next(iter(loader))
    return x, y


def _save_atomic(obj, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def prune_checkpoint(checkpoint: str | Path, pattern: str, sparsity: float = 0.5, calib: int | None = None,
                     iters: int = 1000, out: str | Path | None = None, *, batch: int = 50, absorb_mean: bool = True,
                     device: str = "auto", seed: int = 0, progress: bool = False, log=None) -> dict:
    """Dense, magnitude-only and AdaPrune test accuracy (%) of a `nmsparse train` checkpoint; saves the
    AdaPrune model's state_dict (plain modules) to out. Also returns magnitude_bn_acc (magnitude masks
    plus the same batch-norm recalibration), timing and per-layer reconstruction MSEs."""
    from ..nn.sparsify import squash
    from ..train.data import NUM_CLASSES
    from ..train.evaluate import load_trained
    from ..train.loop import autocast_dtype, evaluate

    p = parse_pattern(pattern, sparsity)  # bad pattern: fail before loading anything
    cfg, model, test_loader, dev, _ = load_trained(checkpoint, device)
    squash(model)
    model.eval()
    _check_pattern_fits(prunable_layers(model), p)
    n = calib if calib is not None else NUM_CLASSES[cfg.data.name]
    if n < 1:
        raise ValueError(f"calib must be >= 1, got {n}")
    calib_x, _ = calibration_set(cfg, dev, n, seed)
    amp = autocast_dtype(cfg, dev)

    def acc(m):
        return evaluate(m, test_loader, dev, amp, cfg.tta_flip)["test_acc"]

    res = {"pattern": str(p), "calib": len(calib_x), "iters": iters, "dense_acc": acc(model)}
    mag = magnitude_prune(copy.deepcopy(model), p)
    res["magnitude_acc"] = acc(mag)
    res["magnitude_bn_acc"] = acc(recalibrate_bn(mag, calib_x))
    del mag
    t0 = time.perf_counter()
    report: list = []
    adaprune(model, calib_x, p, iters=iters, batch=batch, absorb_mean=absorb_mean, bn_recalib_x=calib_x,
             progress=progress, seed=seed, report=report)
    res["adaprune_seconds"] = time.perf_counter() - t0
    res["adaprune_acc"] = acc(model)
    res["layers"] = report
    if out is not None:
        _save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
        res["out"] = str(out)
    if log is not None:
        log(format_result(res))
    return res


def format_result(res: dict) -> str:
    lines = [f"pattern {res['pattern']}, calib {res['calib']}, iters {res['iters']} "
             f"({res.get('adaprune_seconds', 0):.1f} s)",
             f"  dense            {res['dense_acc']:.2f}%",
             f"  magnitude only   {res['magnitude_acc']:.2f}%",
             f"  magnitude + BN   {res['magnitude_bn_acc']:.2f}%",
             f"  AdaPrune         {res['adaprune_acc']:.2f}%"]
    for r in res.get("layers", []):
        lines.append(f"    {r['name']}: MSE magnitude {r['mse_magnitude']:.4g} -> absorbed {r['mse_init']:.4g}"
                     f" -> AdaPrune {r['mse_final']:.4g}")
    if res.get("out"):
        lines.append(f"  saved {res['out']}")
    return "\n".join(lines)


def add_prune_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint.pt written by nmsparse train")
    parser.add_argument("--pattern", required=True, help=f"one of {', '.join(PATTERNS)}")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of blocks pruned (block patterns)")
    parser.add_argument("--calib", type=int, default=None, help="calibration images (default: one per class)")
    parser.add_argument("--iters", type=int, default=1000, help="Adam steps per layer")
    parser.add_argument("--batch", type=int, default=50, help="cached samples per step")
    parser.add_argument("--no-absorb-mean", dest="absorb_mean", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, help="where to save the pruned model's state_dict")


def prune_command(args) -> int:
    try:
        prune_checkpoint(args.checkpoint, args.pattern, args.sparsity, args.calib, args.iters, args.out,
                         batch=args.batch, absorb_mean=args.absorb_mean, device=args.device, seed=args.seed,
                         log=print)
    except (ValueError, FileNotFoundError) as e:
        print(f"nmsparse prune: error: {e}", file=sys.stderr)
        return 2
    return 0
