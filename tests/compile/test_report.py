"""layers.png: one named row per layer, readable at any depth (the figure's artists, not its pixels)."""

from types import SimpleNamespace

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nmsparse.compile.report import LAYER_ROW_IN, LAYERS_MAX_HEIGHT_IN, layers_figure  # noqa: E402


def fake_compiled(n):
    layers = [SimpleNamespace(name=f"layers.{i // 3}.{i % 3}.conv{i % 3 + 1}",
                              estimate=SimpleNamespace(dense_time_s=1e-4 * (1 + i % 5), time_s=5e-5 * (1 + i % 5),
                                                       dense_bytes_moved=1e6, bytes_moved=6e5)) for i in range(n)]
    return SimpleNamespace(layers=layers, target=SimpleNamespace(label="aie2 (4x4)"))


@pytest.mark.parametrize("n", [6, 54])
def test_every_layer_is_named_on_a_horizontal_row(n):
    c = fake_compiled(n)
    fig = layers_figure(c)
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        names = [t.get_text() for t in ax.get_yticklabels()]
        assert names == [p.name for p in c.layers]  # call order, top down
        assert ax.get_ylim()[0] > ax.get_ylim()[1]  # inverted: the first layer at the top
        assert all(t.get_rotation() == 0 for t in ax.get_yticklabels())
        # rows far enough apart for 7-point names: at least LAYER_ROW_IN inches each
        assert fig.get_figheight() >= n * LAYER_ROW_IN
        bars = [p for p in ax.patches]
        assert len(bars) == 2 * n and all(b.get_height() < 0.5 for b in bars)  # dense and compiled, horizontal
        assert len(fig.axes) == 3 and all(a.get_ylim() == ax.get_ylim() for a in fig.axes)
    finally:
        plt.close(fig)


@pytest.mark.slow
def test_very_deep_networks_thin_the_names_and_cap_the_height():
    c = fake_compiled(400)
    fig = layers_figure(c)
    try:
        assert fig.get_figheight() <= LAYERS_MAX_HEIGHT_IN
        names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert 100 <= len(names) < 400 and names[0] == c.layers[0].name
        assert "every" in fig.axes[0].get_ylabel()
    finally:
        plt.close(fig)
