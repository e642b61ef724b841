"""compare.png / curves.png and masks.png: the figures' artists, not their pixels."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from nmsparse.patterns import nm_mask  # noqa: E402
from nmsparse.train.plots import (LEGEND_BELOW_FROM, SEED_LINES_UP_TO, config_style, curves_figure,  # noqa: E402
                                  masks_figure, mean_std, plot_curves, plot_masks)


def history(epochs, offset=0.0):
    return [{"epoch": e, "step": 10 * e, "train_loss": 2.0 / e + offset, "test_acc": 50.0 + 5 * e + offset}
            for e in range(1, epochs + 1)]


def labelled_lines(ax):
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def bands(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection) and c.get_gid() == "std-band"]


def visible_xticks(fig, ax):
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_mean_std_over_seeds():
    epochs, mean, std = mean_std([history(3), history(3, offset=2.0), history(2, offset=4.0)], "test_acc")
    assert epochs == [1, 2, 3]
    assert mean == pytest.approx([57.0, 62.0, 66.0]) and std == pytest.approx([2.0, 2.0, 2 ** 0.5])


def test_one_colour_mean_curve_and_band_per_config():
    runs = {f"cfg{i}": [history(5, offset=i), history(5, offset=i + 1)] for i in range(3)}
    fig = curves_figure(runs, "t")
    try:
        for ax in fig.axes:
            means = labelled_lines(ax)
            assert [ln.get_label() for ln in means] == [f"cfg{i} (2 seeds)" for i in range(3)]
            assert len({ln.get_color() for ln in means}) == 3
            assert [tuple(ln.get_xdata()) for ln in means] == [(1, 2, 3, 4, 5)] * 3
            assert len(bands(ax)) == 3  # one +-std band per config
            seeds = [ln for ln in ax.get_lines() if ln.get_gid() == "seed"]
            assert len(seeds) == 6 and all(s.get_linewidth() < means[0].get_linewidth() for s in seeds)
        acc = labelled_lines(fig.axes[0])[0]
        assert list(acc.get_ydata()) == pytest.approx([55.5, 60.5, 65.5, 70.5, 75.5])
    finally:
        plt.close(fig)


def test_epoch_ticks_are_integers():
    fig = curves_figure({"a": [history(7)], "b": [history(7)]})
    try:
        for ax in fig.axes:
            ticks = visible_xticks(fig, ax)
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_one_epoch_run_is_a_visible_point_over_a_single_tick(tmp_path):
    fig = curves_figure({"one": [history(1)]})
    try:
        for ax in fig.axes:
            (line,) = labelled_lines(ax)
            assert line.get_marker() == "o" and list(line.get_xdata()) == [1]
            assert visible_xticks(fig, ax) == [1.0]
    finally:
        plt.close(fig)
    assert plot_curves({"one": [history(1)]}, tmp_path / "c.png").stat().st_size > 1000


def test_many_configs_get_one_legend_below_and_distinct_styles():
    n = 12
    runs = {f"config {i}": [history(3, offset=i), history(3, offset=i + 0.5)] for i in range(n)}
    assert n >= LEGEND_BELOW_FROM and n > SEED_LINES_UP_TO
    fig = curves_figure(runs)
    try:
        assert all(ax.get_legend() is None for ax in fig.axes)
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == [f"config {i} (2 seeds)" for i in range(n)]
        # below the panels: the legend's top is under the axes' bottom
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        assert legend.get_window_extent(r).y1 <= min(ax.get_tightbbox(r).y0 for ax in fig.axes) + 1
        assert not any(ln.get_gid() == "seed" for ax in fig.axes for ln in ax.get_lines())  # bands only
        styles = {(ln.get_color(), ln.get_linestyle()) for ln in labelled_lines(fig.axes[0])}
        assert len(styles) == n
    finally:
        plt.close(fig)
    assert config_style(3) != config_style(13) and config_style(3)["color"] == config_style(13)["color"]


def test_few_configs_keep_the_legend_in_the_panel():
    fig = curves_figure({"a": [history(3)], "b": [history(3)]})
    try:
        assert not fig.legends and fig.axes[0].get_legend() is not None
    finally:
        plt.close(fig)


def test_masks_have_axis_labels_and_a_kept_zero_legend(tmp_path):
    conv = nm_mask(torch.randn(16, 3, 3, 8), 2, 4).permute(0, 3, 1, 2)  # (Co, Ci, kh, kw), 2:4 along Ci
    masks = {"conv": conv, "fc": nm_mask(torch.randn(8, 16), 2, 4)}
    fig = masks_figure(masks)
    try:
        used = [ax for ax in fig.axes if ax.images]
        assert len(used) == 2
        for ax in used:
            assert "output channel" in ax.get_ylabel() and "input" in ax.get_xlabel()
        assert "(kh, kw, Ci)" in used[0].get_xlabel()
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["kept", "zero"]
    finally:
        plt.close(fig)
    assert plot_masks(masks, tmp_path / "m.png").stat().st_size > 1000
