"""The training loop: data, model, sparsify, SGD with a per-iteration schedule, eval, logs, checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from ..data import NUM_CLASSES, build_loaders, normalize_uint8
from ..models import autocast_dtype, build_from_record, evaluate, model_record
from ..models.evaluate import autocast
from ..nn.sparsify import sparsify, sparsity_report
from . import distributed
from .checkpoint import check_resume, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsLog, read_metrics
from .optim import build_optimizer
from .schedule import lr_factor

CHECKPOINT = "checkpoint.pt"


def loaders_for(cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1):
    """The config's train and test loaders (see data.build_loaders)."""
    return build_loaders(cfg.data, device, seed=cfg.seed, channels_last=cfg.channels_last, rank=rank, world=world)


def record_for(cfg: TrainConfig, sample_shape: tuple[int, ...]) -> dict:
    """The checkpoint's model record: cfg.model for samples of this shape and the dataset's classes."""
    return model_record(cfg.model.name, cfg.model.kwargs, sample_shape, NUM_CLASSES[cfg.data.name])


def _set_determinism(cfg: TrainConfig) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def train(cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = True, log=print) -> dict:
    """Train cfg to the end (resuming from out_dir/checkpoint.pt when it exists); returns the summary."""
    info, device = distributed.setup(cfg.device)
    _set_determinism(cfg)
    out = Path(out_dir) if out_dir is not None else None
    main = info.is_main and out is not None
    train_loader, test_loader = loaders_for(cfg, device, info.rank, info.world_size)
    record = record_for(cfg, tuple(next(iter(test_loader))[0].shape[1:]))
    model = build_from_record(record)
    if cfg.sparsity is not None:
        sparsify(model, cfg.sparsity)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    opt = build_optimizer(model, cfg.optim)
    net = nn.parallel.DistributedDataParallel(model) if info.enabled else model
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    steps_per_epoch = len(train_loader)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    peak = cfg.optim.lr * (cfg.data.batch_size * info.world_size / 256 if cfg.optim.batch_lr_scaling else 1)

    epoch, step, history = 0, 0, []
    ckpt = out / CHECKPOINT if out is not None else None
    # With resume=False over an existing run, its files describe it until the new run's first checkpoint.
    replacing = not resume and ckpt is not None and ckpt.exists()
    if resume and ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt, map_location=device)
        note = check_resume(ckpt, state, cfg.to_dict())
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, history = state["epoch"], state["step"], state["history"]
        if info.is_main:
            if note:
                log(f"note: {note}")
            log(f"resumed from {ckpt} at epoch {epoch} (step {step})")
    metrics = MetricsLog(out, enabled=main)
    if main and not replacing:
        _describe_run(out, cfg, metrics, history)

    n_epochs = math.ceil(cfg.epochs)
    t_start = time.perf_counter()
    while epoch < n_epochs and step < total:
        model.train()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        else:
            train_loader.sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(train_loader, desc=f"{cfg.name} epoch {epoch + 1}/{n_epochs}", leave=False,
                   disable=not (cfg.progress and info.is_main) or None, dynamic_ncols=True)
        for x, y in bar:
            if step >= total:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = normalize_uint8(x, device)
            lr = peak * lr_factor(cfg.schedule.name, step, total, warmup, cfg.schedule.start_factor,
                                  cfg.schedule.end_factor)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(device, amp_dtype):
                loss = F.cross_entropy(net(x), y, label_smoothing=cfg.optim.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach().float() * len(y)
            seen += len(y)
            step += 1
        train_time = time.perf_counter() - t0
        epoch += 1
        row = {"epoch": epoch, "step": step, "lr": lr,
               "train_loss": float(distributed.all_reduce_mean(loss_sum / max(seen, 1))),
               "epoch_time_s": round(train_time, 3)}
        if epoch % cfg.eval_every == 0 or epoch == n_epochs or step >= total:
            row.update(evaluate(model, test_loader, device, amp_dtype, cfg.tta_flip))
        history.append(row)
        if main:
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                                   "history": history, "config": cfg.to_dict(), "model_record": record})
            if replacing:  # the old checkpoint is gone now: its config, metrics and summary go too
                _describe_run(out, cfg, metrics, history[:-1])
                replacing = False
            metrics.log(row)  # after the checkpoint: a resume rewrites the metrics from its history
        if info.is_main:
            acc = f", test acc {row['test_acc']:.2f}%" if "test_acc" in row else ""
            log(f"{cfg.name}: epoch {epoch}/{n_epochs}, train loss {row['train_loss']:.4f}{acc} "
                f"({train_time:.1f} s)")
    summary = _summary(cfg, model, history, time.perf_counter() - t_start)
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _describe_run(out: Path, cfg: TrainConfig, metrics: MetricsLog, history: list[dict]) -> None:
    """Make config.yaml and the metrics files say what the checkpoint holds; drop a summary of an earlier state."""
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics.rewrite(history)
    (out / "summary.json").unlink(missing_ok=True)


def _summary(cfg: TrainConfig, model: nn.Module, history: list[dict], seconds: float) -> dict:
    evals = [r for r in history if "test_acc" in r]
    return {
        "name": cfg.name,
        "pattern": pattern_label(cfg),
        "final_test_acc": evals[-1]["test_acc"] if evals else None,
        "best_test_acc": max(r["test_acc"] for r in evals) if evals else None,
        "epochs": history[-1]["epoch"] if history else 0,
        "train_seconds_this_session": round(seconds, 2),
        "sparsity": sparsity_report(model),
    }


def pattern_label(cfg: TrainConfig) -> str:
    """Short label of the run's sparsity, e.g. 'SDGP rescale 2:4' or 'SR-STE 2:4 + SDGP max 2:4'."""
    s = cfg.sparsity
    if s is None:
        return "dense"
    parts = []
    if s.weight is not None:
        w = s.weight
        if hasattr(w, "block"):
            parts.append(f"block {w.block[0]}x{w.block[1]} {w.sparsity:.0%}")
        else:
            kind = {"srste": "SR-STE", "ste": "STE", "fixed": "fixed"}[w.method]
            parts.append(f"{kind} {w.n}:{w.m}{'-T' if w.transposable else ''}")
    if s.grad is not None:
        parts.append(f"SDGP {s.grad.method} {s.grad.n}:{s.grad.m}")
    return " + ".join(parts)


def read_run(run_dir: str | Path) -> dict:
    """Metrics rows and summary of a finished or interrupted run directory."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise NotADirectoryError(f"{run_dir} is a file, not a run directory (the directory nmsparse train wrote, "
                                 f"with metrics.jsonl and checkpoint.pt)")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    summary_path = run_dir / "summary.json"
    return {"metrics": read_metrics(run_dir),
            "summary": json.loads(summary_path.read_text()) if summary_path.exists() else None}
