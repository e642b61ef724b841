"""`nmsparse prune CHECKPOINT --pattern ... --out FILE`: AdaPrune a trained checkpoint, with the baselines."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

from ..common.system import check_parent_dirs, resolve_device
from ..data import NUM_CLASSES, STATS, DataConfig, TensorLoader, build_loaders, load_dataset, normalize_uint8
from ..models import autocast_dtype, evaluate, load_model, save_checkpoint
from ..nn.sparsify import squash
from .adaprune import adaprune, check_settings, recalibrate_bn
from .magnitude import PATTERNS, check_pattern_fits, magnitude_prune, parse_pattern, prunable_layers


def calibration_set(d: DataConfig, dev, n: int, seed: int = 0, channels_last: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised, un-augmented training images of data config `d`: the first n of a seeded shuffle, at most
    ceil(n / classes) per class (so n = classes gives one image per class)."""
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


def prune_checkpoint(checkpoint: str | Path, pattern: str, sparsity: float | None = None, calib: int | None = None,
                     iters: int = 1000, out: str | Path | None = None, *, batch: int = 50, absorb_mean: bool = True,
                     magnitude_only: bool = False, device: str = "auto", seed: int = 0, progress: bool = False,
                     log=None) -> dict:
    """Dense, magnitude-only and AdaPrune test accuracy (%) of a `nmsparse train` checkpoint.

    Saves the pruned model (AdaPrune's, or with ``magnitude_only`` the magnitude-pruned one) to
    ``out`` as a training checkpoint of plain modules, which `nmsparse eval` and `nmsparse compile`
    read like any other. Also returns magnitude_bn_acc (magnitude masks plus the same batch-norm
    recalibration), timing and per-layer reconstruction MSEs.
    """
    # Everything that can be refused is refused before the model is loaded and pruned.
    p = parse_pattern(pattern, sparsity)
    check_settings(iters, batch, "--")
    if calib is not None and calib < 1:
        raise ValueError(f"--calib must be >= 1 (calibration images), got {calib}; for no reconstruction "
                         f"use --magnitude-only")
    out = _check_out(out) if out is not None else None
    model, state = load_model(checkpoint)
    cfg = state["config"]
    dev = resolve_device(device)
    data = DataConfig(**cfg["data"])
    _, test_loader = build_loaders(data, dev, channels_last=cfg.get("channels_last", False))
    model = squash(model).to(dev).eval()
    check_pattern_fits(prunable_layers(model), p)
    n = calib if calib is not None else NUM_CLASSES[data.name]
    calib_x, _ = calibration_set(data, dev, n, seed, cfg.get("channels_last", False))
    amp = autocast_dtype(cfg.get("amp", "auto"), dev)

    def acc(m):
        return evaluate(m, test_loader, dev, amp, cfg.get("tta_flip", False))["test_acc"]

    res = {"pattern": str(p), "calib": len(calib_x), "calib_asked": n, "iters": iters, "dense_acc": acc(model),
           "method": "magnitude" if magnitude_only else "adaprune"}
    mag = magnitude_prune(copy.deepcopy(model), p)
    res["magnitude_acc"] = acc(mag)
    if magnitude_only:
        final = mag
        res["magnitude_bn_acc"] = acc(recalibrate_bn(copy.deepcopy(mag), calib_x))
    else:
        res["magnitude_bn_acc"] = acc(recalibrate_bn(mag, calib_x))
        del mag
        t0 = time.perf_counter()
        report: list = []
        adaprune(model, calib_x, p, iters=iters, batch=batch, absorb_mean=absorb_mean, bn_recalib_x=calib_x,
                 progress=progress, seed=seed, report=report)
        res["adaprune_seconds"] = time.perf_counter() - t0
        res["adaprune_acc"] = acc(model)
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


def format_result(res: dict) -> str:
    calib = f"calib {res['calib']}"
    if res.get("calib_asked", res["calib"]) != res["calib"]:
        calib += f" (asked {res['calib_asked']}: all the training set offers)"
    head = (f"pattern {res['pattern']}, {calib}, magnitude only" if res.get("method") == "magnitude" else
            f"pattern {res['pattern']}, {calib}, iters {res['iters']} ({res.get('adaprune_seconds', 0):.1f} s)")
    lines = [head,
             f"  dense            {res['dense_acc']:.2f}%",
             f"  magnitude only   {res['magnitude_acc']:.2f}%",
             f"  magnitude + BN   {res['magnitude_bn_acc']:.2f}%"]
    if "adaprune_acc" in res:
        lines.append(f"  AdaPrune         {res['adaprune_acc']:.2f}%")
    for r in res.get("layers", []):
        lines.append(f"    {r['name']}: MSE magnitude {r['mse_magnitude']:.4g} -> absorbed {r['mse_init']:.4g}"
                     f" -> AdaPrune {r['mse_final']:.4g}")
    if res.get("out"):
        what = "magnitude-pruned" if res.get("method") == "magnitude" else "AdaPrune"
        lines.append(f"  saved the {what} model to {res['out']} (nmsparse eval / nmsparse compile read it)")
    return "\n".join(lines)


def add_prune_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint.pt written by nmsparse train")
    parser.add_argument("--pattern", required=True,
                        help=f"{', '.join(PATTERNS)}, or any N:M, N:M-T (transposable) or blockRxC")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of blocks zeroed, block patterns only (default 0.5)")
    parser.add_argument("--calib", type=int, default=None, help="calibration images (default: one per class)")
    parser.add_argument("--iters", type=int, default=1000, help="Adam steps per layer (default 1000)")
    parser.add_argument("--batch", type=int, default=50, help="cached samples per Adam step (default 50)")
    parser.add_argument("--no-absorb-mean", dest="absorb_mean", action="store_false",
                        help="do not fold the pruned weights' mean output into the bias before reconstructing")
    parser.add_argument("--magnitude-only", action="store_true",
                        help="skip AdaPrune: save the magnitude-pruned model (accuracies are still reported)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample and Adam batch order (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, help="file for the pruned model (a checkpoint of plain modules)")


def prune_command(args) -> int:
    try:
        prune_checkpoint(args.checkpoint, args.pattern, args.sparsity, args.calib, args.iters, args.out,
                         batch=args.batch, absorb_mean=args.absorb_mean, magnitude_only=args.magnitude_only,
                         device=args.device, seed=args.seed, log=print)
    except (ValueError, OSError) as e:
        print(f"nmsparse prune: error: {e}", file=sys.stderr)
        return 2
    return 0
