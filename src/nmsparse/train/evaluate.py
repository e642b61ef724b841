"""`nmsparse eval` and `nmsparse report`: a checkpoint's test accuracy (or validation loss); a run's metrics, masks
and plots."""

from __future__ import annotations

from pathlib import Path

from ..common.text import markdown_table
from ..data import whole_split
from ..models import autocast_dtype, evaluate, load_model
from ..nn.sparsify import format_report, sparsity_report, weight_masks
from . import distributed
from .config import config_from_dict
from .loop import loaders_for, read_run
from .plots import PLOTS_SKIPPED, can_plot, plot_curves, plot_masks


def load_trained(checkpoint: str | Path, device: str = "auto"):
    """(config, model with the checkpoint's weights and masks, test loader, device, state)."""
    model, state = load_model(checkpoint)
    cfg = config_from_dict(state["config"])
    cfg.device = device
    _, dev = distributed.setup(device)
    _, test_loader = loaders_for(cfg, dev)
    return cfg, model.to(dev), test_loader, dev, state


def evaluate_checkpoint(checkpoint: str | Path, device: str = "auto") -> dict:
    """Test-set metrics of a training checkpoint (``nmsparse eval``), with the run's name and epoch."""
    cfg, model, test_loader, dev, state = load_trained(checkpoint, device)
    res = evaluate(model, whole_split(test_loader), dev, autocast_dtype(cfg.amp, dev), cfg.tta_flip)
    return {**res, "name": cfg.name, "epoch": state["epoch"]}


def report_run(run_dir: str | Path) -> str:
    """Markdown: per-epoch metrics and the sparsity report; writes curves.png and masks.png in run_dir (with
    matplotlib; without it the text says how to get them). A checkpoint file stands for its run directory."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint.pt"
    if run_dir.suffix == ".pt" and run_dir.is_file():
        ckpt, run_dir = run_dir, run_dir.parent
        if not (run_dir / "metrics.jsonl").exists():
            raise ValueError(f"{ckpt} is a checkpoint, but {run_dir} has no metrics.jsonl: nmsparse report takes a "
                             f"run directory written by nmsparse train (or its checkpoint.pt); for this checkpoint's "
                             f"test accuracy use nmsparse eval {ckpt}")
    run = read_run(run_dir)
    if not run["metrics"]:
        raise ValueError(f"{run_dir} has no metrics.jsonl: not an nmsparse run directory, or no epoch finished")
    keys = [k for k in ("epoch", "step", "lr", "train_loss", "test_loss", "test_acc", "val_loss", "val_ppl", "val_acc",
                        "epoch_time_s")
            if any(k in r for r in run["metrics"])]
    rows = [[_fmt(r.get(k, "")) for k in keys] for r in run["metrics"]]
    parts = [f"# Run {run_dir}", "", markdown_table(keys, rows)]
    plots = can_plot()
    if plots:
        plot_curves({run_dir.name: [run["metrics"]]}, run_dir / "curves.png")
        parts += ["", f"Curves: {run_dir / 'curves.png'}"]
    if ckpt.exists():
        _, model, *_ = load_trained(ckpt, "cpu")
        report = sparsity_report(model)
        if report:
            parts += ["", "## Sparsity", "", format_report(report)]
            masks = weight_masks(model)
            if masks and plots:
                plot_masks({k: v.cpu() for k, v in masks.items()}, run_dir / "masks.png")
                parts += ["", f"Mask patterns: {run_dir / 'masks.png'}"]
    if not plots:
        parts += ["", PLOTS_SKIPPED]
    return "\n".join(parts)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
