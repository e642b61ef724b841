"""`nmsparse eval` and `nmsparse report`: a checkpoint's test accuracy; a run's metrics, masks and plots."""

from __future__ import annotations

from pathlib import Path

from ..bench.timing import markdown_table
from ..nn.sparsify import format_report, sparsify, sparsity_report, weight_masks
from . import distributed
from .checkpoint import load_checkpoint
from .config import config_from_dict
from .loop import autocast_dtype, build_loaders, evaluate, model_for, read_run
from .plots import plot_curves, plot_masks


def load_trained(checkpoint: str | Path, device: str = "auto"):
    """(config, model with the checkpoint's weights and masks, test loader, device, state)."""
    state = load_checkpoint(checkpoint)
    if "config" not in state or "model" not in state:
        raise ValueError(f"{checkpoint} holds no config/model: not written by nmsparse train")
    cfg = config_from_dict(state["config"])
    cfg.device = device
    _, dev = distributed.setup(device)
    _, test_loader = build_loaders(cfg, dev)
    model = model_for(cfg, tuple(next(iter(test_loader))[0].shape[1:]))
    if cfg.sparsity is not None:
        sparsify(model, cfg.sparsity)
    model.load_state_dict(state["model"])
    return cfg, model.to(dev), test_loader, dev, state


def evaluate_checkpoint(checkpoint: str | Path, device: str = "auto") -> dict:
    cfg, model, test_loader, dev, state = load_trained(checkpoint, device)
    res = evaluate(model, test_loader, dev, autocast_dtype(cfg, dev), cfg.tta_flip)
    return {**res, "name": cfg.name, "epoch": state["epoch"]}


def report_run(run_dir: str | Path) -> str:
    """Markdown: per-epoch metrics and the sparsity report; writes curves.png and masks.png in run_dir."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if not run["metrics"]:
        raise ValueError(f"{run_dir} has no metrics.jsonl: not an nmsparse run directory, or no epoch finished")
    keys = [k for k in ("epoch", "step", "lr", "train_loss", "test_loss", "test_acc", "epoch_time_s")
            if any(k in r for r in run["metrics"])]
    rows = [[_fmt(r.get(k, "")) for k in keys] for r in run["metrics"]]
    parts = [f"# Run {run_dir}", "", markdown_table(keys, rows)]
    plot_curves({run_dir.name: [run["metrics"]]}, run_dir / "curves.png")
    parts += ["", f"Curves: {run_dir / 'curves.png'}"]
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists():
        _, model, *_ = load_trained(ckpt, "cpu")
        report = sparsity_report(model)
        if report:
            parts += ["", "## Sparsity", "", format_report(report)]
            masks = weight_masks(model)
            if masks:
                plot_masks({k: v.cpu() for k, v in masks.items()}, run_dir / "masks.png")
                parts += ["", f"Mask patterns: {run_dir / 'masks.png'}"]
    return "\n".join(parts)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
