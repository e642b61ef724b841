"""PNG plots of training curves and of weight-mask patterns (matplotlib, headless).

`curves_figure` and `masks_figure` build the figures (tests inspect their artists);
`plot_curves` and `plot_masks` save them.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

MARKERS_UP_TO = 30  # curves with at most this many epochs get a marker per point
SEED_LINES_UP_TO = 3  # seeds are drawn as thin lines only when this few configs share the plot
LEGEND_BELOW_FROM = 4  # with this many configs or more the legend goes below the panels
LINESTYLES = ("-", "--", ":", "-.")  # after the 10 colours of tab10, the next 10 configs get the next style
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


def config_style(i: int) -> dict:
    """Colour and line style of the i-th config: tab10 colours, then the same colours dashed, dotted, ..."""
    return {"color": f"C{i % 10}", "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)]}


def mean_std(seeds: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and standard deviation of `key` over the seeds that have it at that epoch.

    A seed that stopped early (or a row without the key) leaves its epochs to the others; the deviation
    is 0 where only one seed has a value.
    """
    by_epoch: dict[int, list[float]] = {}
    for rows in seeds:
        for r in rows:
            if key in r and r[key] is not None:
                by_epoch.setdefault(int(r["epoch"]), []).append(float(r[key]))
    epochs = sorted(by_epoch)
    means = [statistics.fmean(by_epoch[e]) for e in epochs]
    stds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def _integer_epochs(ax, last_epoch: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if last_epoch <= 1:  # one epoch: a single point, centred, with the one tick under it
        ax.set_xlim(0.5, 1.5)


def _plain_log_labels(ax) -> None:
    """Log y-axis labelled with plain numbers (0.6, 1, 2) rather than 6e-01 on a few ticks.

    Minor ticks get labels (every one below half a decade, 2, 3 and 5 times a power of ten up to two
    decades), so a short range still has several labels and a long one is not crowded.
    """
    import math

    from matplotlib.ticker import FuncFormatter

    def minor(v, _pos):
        lo, hi = ax.get_ylim()
        if lo <= 0 or v <= 0 or math.log10(hi / lo) > 2:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        return f"{v:g}" if mantissa in (2, 3, 5) or math.log10(hi / lo) < 0.5 else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def curves_figure(runs: dict[str, list[list[dict]]], title: str = ""):
    """The figure of `plot_curves`: per config one colour, its mean curve, a +-std band and thin seed lines."""
    plt = _pyplot()
    n_cfg = len(runs)
    below = n_cfg >= LEGEND_BELOW_FROM
    legend_rows = -(-n_cfg // 3) if below else 0
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4 + 0.25 * legend_rows), layout="constrained")
    last_epoch = 1
    multi_seed = False
    losses = []
    # Language models are judged by validation loss (lower is better), classifiers by test accuracy.
    text = any("val_loss" in r for seeds in runs.values() for rows in seeds for r in rows)
    metric = "val_loss" if text else "test_acc"
    for i, (label, seeds) in enumerate(runs.items()):
        style = config_style(i)
        multi_seed |= len(seeds) > 1
        name = f"{label} ({len(seeds)} seeds)" if len(seeds) > 1 else label
        for ax, key in ((ax_acc, metric), (ax_loss, "train_loss")):
            epochs, mean, std = mean_std(seeds, key)
            if not epochs:
                continue
            last_epoch = max(last_epoch, epochs[-1])
            if key == "train_loss":
                losses += mean
            # A marker per point when points are few: a one-epoch run is a single point, invisible as a bare line.
            marker = "o" if len(epochs) <= MARKERS_UP_TO else None
            ax.plot(epochs, mean, label=name, marker=marker, markersize=4, linewidth=1.8, **style)
            if len(seeds) > 1:
                lo = [m - s for m, s in zip(mean, std)]
                hi = [m + s for m, s in zip(mean, std)]
                if key == "train_loss":  # the band must stay positive should the axis be logarithmic
                    lo = [max(v, m * 0.05) for v, m in zip(lo, mean)]
                ax.fill_between(epochs, lo, hi, color=style["color"], alpha=0.18, linewidth=0, gid="std-band")
                if n_cfg <= SEED_LINES_UP_TO:
                    for rows in seeds:
                        pts = [(r["epoch"], r[key]) for r in rows if key in r and r[key] is not None]
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=style["color"],
                                linewidth=0.6, alpha=0.45, gid="seed")
    spread = ", mean +- std over seeds" if multi_seed else ""
    if text:
        ax_acc.set(xlabel="epoch (data.steps_per_epoch steps)", ylabel="validation loss (nats/char)",
                   title=f"validation loss{spread}")
    else:
        ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title=f"test accuracy{spread}")
    # A log axis once the loss falls by more than 10x; a linear one reads better over a shorter range.
    log = bool(losses) and min(losses) > 0 and max(losses) / min(losses) > 10
    ax_loss.set(xlabel="epoch", ylabel="train loss (log)" if log else "train loss", title=f"train loss{spread}")
    if log:
        ax_loss.set_yscale("log")
        _plain_log_labels(ax_loss)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        _integer_epochs(ax, last_epoch)
    handles, labels = ax_acc.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_loss.get_legend_handles_labels()
    if below:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, n_cfg), fontsize=8, frameon=False)
    elif handles:
        ax_acc.legend(handles, labels, fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(runs: dict[str, list[list[dict]]], path: str | Path, title: str = "") -> Path:
    """Test accuracy and train loss per epoch; runs maps a label to one metrics list per seed."""
    plt = _pyplot()
    fig = curves_figure(runs, title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mask_2d(m: torch.Tensor) -> torch.Tensor:
    """A mask as (output channels, inputs): a conv's (Co, Ci, kh, kw) in channels-last order (kh, kw, Ci)."""
    return m.permute(0, 2, 3, 1).reshape(m.shape[0], -1) if m.dim() == 4 else m.reshape(m.shape[0], -1)


def masks_figure(masks: dict[str, torch.Tensor], window: int = 32):
    """The figure of `plot_masks`: one panel per layer (at most 8), axes labelled, a kept/zero legend."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    names = list(masks)[:8]
    cols = min(4, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        m = masks[name]
        m2 = mask_2d(m)[:window, :window].float()
        ax.imshow(m2.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\n{tuple(m.shape)}, density {m.float().mean():.2f}", fontsize=8)
        inputs = "input (kh, kw, Ci)" if m.dim() == 4 else "input feature"
        ax.set_xlabel(f"{inputs}, first {m2.shape[1]}", fontsize=7)
        ax.set_ylabel(f"output channel, first {m2.shape[0]}", fontsize=7)
        ax.tick_params(labelsize=6)
    legend = [Patch(facecolor="black", edgecolor="black", label="kept"),
              Patch(facecolor="white", edgecolor="black", label="zero")]
    fig.legend(handles=legend, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def plot_masks(masks: dict[str, torch.Tensor], path: str | Path, window: int = 32) -> Path:
    """The top-left window x window of each layer's weight mask (2-D view, kept = dark)."""
    plt = _pyplot()
    fig = masks_figure(masks, window)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
