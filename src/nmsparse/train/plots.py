"""PNG plots of training curves and of weight-mask patterns (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch

MARKERS_UP_TO = 30  # curves with at most this many epochs get a marker per point
# matplotlib is the optional [plot] extra: without it runs, tables and reports are written and this line is printed.
PLOTS_SKIPPED = "Plots skipped: matplotlib is not installed (pip install 'nmsparse[plot]' to get them)."


def can_plot() -> bool:
    """Whether matplotlib can be imported (the [plot] extra is installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, list[list[dict]]], path: str | Path, title: str = "") -> Path:
    """Test accuracy and train loss per epoch; runs maps a label to one metrics list per seed."""
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, seeds) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for j, rows in enumerate(seeds):
            ev = [r for r in rows if "test_acc" in r]
            # Markers when points are few: a one-epoch run is a single point, invisible as a bare line.
            style = dict(color=color, alpha=0.8, marker="o" if len(rows) <= MARKERS_UP_TO else None, markersize=4)
            ax_acc.plot([r["epoch"] for r in ev], [r["test_acc"] for r in ev], label=label if j == 0 else None,
                        **style)
            ax_loss.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows],
                         label=label if j == 0 else None, **style)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="train loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_masks(masks: dict[str, torch.Tensor], path: str | Path, window: int = 32) -> Path:
    """The top-left window x window of each layer's weight mask (2-D view, kept = dark)."""
    plt = _pyplot()
    names = list(masks)[:8]
    cols = min(4, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        m = masks[name]
        m2 = m.permute(0, 2, 3, 1).reshape(m.shape[0], -1) if m.dim() == 4 else m.reshape(m.shape[0], -1)
        ax.imshow(m2[:window, :window].float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\n{tuple(m.shape)}, density {m.float().mean():.2f}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
