"""The training loop: data, model, sparsify, SGD with a per-iteration schedule, eval, logs, checkpoints.

The masks are attached to the optimizer (``nn.mask_step.attach``): their steps are optimizer steps.

A run directory holds one training process at a time (run.lock). Checkpoints are written at every epoch end
and, as the config asks, inside epochs; the one they replace is kept as checkpoint.prev.pt, which a resume uses
when checkpoint.pt cannot be loaded. A resume from either is exact: the data order and every random choice
depend only on the seed, the epoch and the step. Ctrl-C ends train() with TrainingInterrupted, whose text is
the one line the command prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from ..common.system import flush_denormal
from ..data import build_loaders, normalize_uint8, num_classes, set_epoch, whole_split
from ..models import autocast_dtype, build_from_record, evaluate, headline, model_record
from ..models.evaluate import autocast
from ..nn.mask_step import attach
from ..nn.sparsify import sparsify, sparsity_report
from . import distributed
from .checkpoint import check_resume, keep_previous, load_resumable, previous_path, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsLog, read_metrics
from .optim import build_optimizer, keep_fused_choice
from .runlock import RunLock
from .schedule import lr_factor

CHECKPOINT = "checkpoint.pt"
PROGRESS_EVERY_S = 30.0  # without a terminal (CI logs, nohup): one progress line this often
TIME_CHECK_EVERY = 20  # under torchrun: steps between agreeing (one broadcast) on a time-based checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during train(): the text says where the last checkpoint is and that the same command resumes."""


class _CtrlC:
    """Remembers a Ctrl-C. The KeyboardInterrupt Python raises for it is lost when it lands in a finalizer
    (``__del__``, a weakref callback: "Exception ignored"), so the loop also checks ``hit`` at every step."""

    def __init__(self):
        self.hit, self._old = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.hit = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def loaders_for(cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1):
    """The config's train and test loaders (see data.build_loaders)."""
    return build_loaders(cfg.data, device, seed=cfg.seed, channels_last=cfg.channels_last, rank=rank, world=world)


def record_for(cfg: TrainConfig, sample_shape: tuple[int, ...]) -> dict:
    """The checkpoint's model record: cfg.model for samples of this shape and the dataset's classes (a text
    corpus's vocabulary)."""
    return model_record(cfg.model.name, cfg.model.kwargs, sample_shape, num_classes(cfg.data))


def _set_determinism(cfg: TrainConfig) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG's seed for one training step (dropout and the like): a function of seed, step and rank."""
    return int(np.random.SeedSequence([seed, step, rank, 3]).generate_state(1, np.uint64)[0] >> 1)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of class logits (B, C), or of a language model's (B, T, V) logits per token."""
    if logits.dim() == 3:
        logits, y = logits.flatten(0, 1), y.flatten()
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def _on_terminal() -> bool:
    """Whether progress goes to a terminal (tqdm's bar, on stderr) rather than to a log."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def train(cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = True, log=print) -> dict:
    """Train cfg to the end and return the summary; resumes from out_dir/checkpoint.pt (or the previous checkpoint
    beside it, when that one cannot be loaded) unless resume=False.

    Only rank 0 writes under torchrun. RunInUse when another live process trains into out_dir; Ctrl-C raises
    TrainingInterrupted saying where the last checkpoint is. Subnormal floats are flushed to zero for the run
    when cfg.flush_denormal (the default), and the caller's mode is back afterwards.
    """
    with flush_denormal(cfg.flush_denormal):
        return _train(cfg, out_dir, resume, log)


def _train(cfg: TrainConfig, out_dir: Path | str | None, resume: bool, log) -> dict:
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
    if cfg.sparsity is not None:
        attach(model, opt)  # masks step once per optimizer step (one skipped by the gradient scaler does not count)
    net = nn.parallel.DistributedDataParallel(model) if info.enabled else model
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    steps_per_epoch = len(train_loader)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    peak = cfg.optim.lr * (cfg.data.batch_size * info.world_size / 256 if cfg.optim.batch_lr_scaling else 1)
    ckpt = out / CHECKPOINT if out is not None else None

    with RunLock(out) if main else contextlib.nullcontext(), contextlib.ExitStack() as stack:
        epoch, step, history, skip, partial = 0, 0, [], 0, None
        last = None  # (file, epoch, step, batch) of the newest checkpoint on disk, for the Ctrl-C message
        found = ckpt is not None and (ckpt.exists() or previous_path(ckpt).exists())
        # With resume=False over an existing run, its files describe it until the new run's first checkpoint.
        replacing = not resume and found
        keep = not replacing  # keep the checkpoint.pt a save replaces as checkpoint.prev.pt
        if resume and found:
            state, used, fallback = load_resumable(ckpt, map_location=device)
            note = check_resume(used, state, cfg.to_dict(), steps_per_epoch)
            model.load_state_dict(state["model"])
            chosen = [g.get("fused") for g in opt.param_groups]
            opt.load_state_dict(state["optimizer"])
            if keep_fused_choice(opt, chosen) and info.is_main:
                was, now = ("not fused", "is") if chosen[0] else ("fused", "is not")
                log(f"note: the checkpoint's AdamW was {was}; this run's {now} (optim.fused and the device decide; "
                    "the same update to rounding)")
            scaler.load_state_dict(state["scaler"])
            epoch, step, history = state["epoch"], state["step"], state["history"]
            skip, partial = state.get("epoch_step", 0), state.get("epoch_partial")
            keep = used == ckpt  # a checkpoint.pt that could not be loaded is not worth keeping
            last = (used, epoch, step, skip)
            if info.is_main:
                for n in (fallback, note):
                    if n:
                        log(f"note: {n}")
                where = f"epoch {epoch}" if not skip else f"epoch {epoch + 1}, batch {skip} of {steps_per_epoch}"
                log(f"resumed from {used} at {where} (step {step})")
        metrics = MetricsLog(out, enabled=main)
        if main and not replacing:
            _describe_run(out, cfg, metrics, history)

        def save(extra: dict, described: list[dict]) -> None:
            """Write a checkpoint (rank 0), keeping the one it replaces; `described`: the history to describe."""
            nonlocal keep, replacing
            if keep and ckpt.exists():
                keep_previous(ckpt)
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scaler": scaler.state_dict(), "history": history, "config": cfg.to_dict(),
                                   "model_record": record, **extra})
            keep = True
            if replacing:  # the old checkpoints are gone now: their config, metrics and summary go too
                previous_path(ckpt).unlink(missing_ok=True)
                _describe_run(out, cfg, metrics, described)
                replacing = False

        n_epochs = math.ceil(cfg.epochs)
        every_steps, every_s = cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes * 60
        lines = cfg.progress and info.is_main and not _on_terminal()
        t_start = time.perf_counter()
        last_save = t_start
        try:
            ctrl_c = stack.enter_context(_CtrlC())
            while epoch < n_epochs and step < total:
                model.train()
                set_epoch(train_loader, epoch, skip)
                loss_sum, seen, t_before = torch.zeros((), device=device), 0, 0.0
                if skip and partial is not None:  # the resumed epoch's loss so far, per rank
                    if len(partial["loss_sum"]) == info.world_size:
                        loss_sum = partial["loss_sum"][info.rank].to(device).clone()
                        seen = int(partial["seen"][info.rank])
                    t_before = float(partial.get("time_s", 0.0))
                batch, skip, partial = skip, 0, None
                t0 = time.perf_counter()
                line_t, line_seen = t0, seen
                bar = tqdm(train_loader, desc=f"{cfg.name} epoch {epoch + 1}/{n_epochs}", leave=False,
                           initial=batch, total=steps_per_epoch,
                           disable=not (cfg.progress and info.is_main) or None, dynamic_ncols=True)
                for x, y in bar:
                    if ctrl_c.hit:
                        raise KeyboardInterrupt
                    if step >= total:
                        break
                    torch.manual_seed(_step_seed(cfg.seed, step, info.rank))
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if x.dtype == torch.uint8:
                        x = normalize_uint8(x, device)
                    lr = peak * lr_factor(cfg.schedule.name, step, total, warmup, cfg.schedule.start_factor,
                                          cfg.schedule.end_factor)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    with autocast(device, amp_dtype):
                        loss = loss_fn(net(x), y, cfg.optim.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.optim.grad_clip:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    loss_sum += loss.detach().float() * len(y)
                    seen += len(y)
                    step += 1
                    batch += 1
                    now = time.perf_counter()
                    if lines and now - line_t >= PROGRESS_EVERY_S:
                        rate = (seen - line_seen) * info.world_size / max(now - line_t, 1e-9)
                        unit = "images" if y.dim() == 1 else "sequences"
                        log(f"{cfg.name}: epoch {epoch + 1}/{n_epochs}, step {step}/{total}, "
                            f"loss {float(loss_sum) / max(seen, 1):.4f}, {rate:.0f} {unit}/s")
                        line_t, line_seen = now, seen
                    if ckpt is None or batch >= steps_per_epoch or step >= total:
                        continue  # the epoch-end checkpoint follows
                    due = bool(every_steps) and step % every_steps == 0
                    if every_s and (not info.enabled or step % TIME_CHECK_EVERY == 0):
                        due = distributed.rank0_decides(due or now - last_save >= every_s, device)
                    if due:
                        sums = distributed.gather(loss_sum.detach().float())
                        counts = distributed.gather(torch.tensor(seen, device=device))
                        if main:
                            save({"epoch": epoch, "step": step, "epoch_step": batch,
                                  "epoch_partial": {"loss_sum": sums.cpu(), "seen": counts.cpu(),
                                                    "time_s": t_before + now - t0}}, history)
                        last, last_save = (ckpt, epoch, step, batch), now
                train_time = t_before + time.perf_counter() - t0
                epoch += 1
                row = {"epoch": epoch, "step": step, "lr": lr,
                       "train_loss": float(distributed.all_reduce_mean(loss_sum / max(seen, 1))),
                       "epoch_time_s": round(train_time, 3)}
                last_epoch = epoch == n_epochs or step >= total
                if epoch % cfg.eval_every == 0 or last_epoch:
                    # A text loader evaluating a sample of the validation blocks gives the whole split at the end.
                    loader = whole_split(test_loader) if last_epoch else test_loader
                    row.update(evaluate(model, loader, device, amp_dtype, cfg.tta_flip))
                history.append(row)
                if main:
                    save({"epoch": epoch, "step": step}, history[:-1])
                    metrics.log(row)  # after the checkpoint: a resume rewrites the metrics from its history
                if ckpt is not None:
                    last, last_save = (ckpt, epoch, step, 0), time.perf_counter()
                if info.is_main:
                    acc = f", test acc {row['test_acc']:.2f}%" if "test_acc" in row else ""
                    if "val_loss" in row:
                        acc = f", val loss {row['val_loss']:.4f} (perplexity {row['val_ppl']:.2f})"
                    log(f"{cfg.name}: epoch {epoch}/{n_epochs}, train loss {row['train_loss']:.4f}{acc} "
                        f"({train_time:.1f} s)")
        except KeyboardInterrupt as e:
            if isinstance(e, TrainingInterrupted):
                raise
            raise TrainingInterrupted(_interrupted(ckpt, last, replacing, steps_per_epoch, total)) from None
        summary = _summary(cfg, model, history, time.perf_counter() - t_start)
        if main:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _interrupted(ckpt: Path | None, last: tuple | None, replacing: bool, steps_per_epoch: int, total: int) -> str:
    """The one line for Ctrl-C: where the last checkpoint is and what the same command will do."""
    if ckpt is None:
        return "interrupted; nothing was saved (no run directory)"
    if last is None:
        if replacing:
            return (f"interrupted before the new run's first checkpoint: {ckpt} still holds the earlier run; the "
                    f"same command (with --restart) starts the new run again")
        return f"interrupted before the first checkpoint: nothing saved in {ckpt.parent}; the same command starts again"
    path, epoch, step, batch = last
    where = f"end of epoch {epoch}" if not batch else f"epoch {epoch + 1}, batch {batch} of {steps_per_epoch}"
    return f"interrupted; the last checkpoint is {path} ({where}, step {step} of {total}): the same command resumes it"


def _describe_run(out: Path, cfg: TrainConfig, metrics: MetricsLog, history: list[dict]) -> None:
    """Make config.yaml and the metrics files say what the checkpoint holds; drop a summary of an earlier state."""
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics.rewrite(history)
    (out / "summary.json").unlink(missing_ok=True)


def _summary(cfg: TrainConfig, model: nn.Module, history: list[dict], seconds: float) -> dict:
    """The run's result: `metric` names the headline number (test_acc, or val_loss for a language model), `final`
    and `best` are its values (also under final_<metric> and best_<metric>)."""
    evals = [r for r in history if "test_acc" in r or "val_loss" in r]
    key, _, higher = headline(evals[-1] if evals else {})
    values = [r[key] for r in evals]
    best = (max if higher else min)(values) if values else None
    extra = {"final_val_ppl": evals[-1]["val_ppl"]} if key == "val_loss" and evals else {}
    return {
        "name": cfg.name,
        "pattern": pattern_label(cfg),
        "metric": key,
        "final": values[-1] if values else None,
        "best": best,
        f"final_{key}": values[-1] if values else None,
        f"best_{key}": best,
        **extra,
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
