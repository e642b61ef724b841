"""The compile report: a Markdown table per layer with totals, and PNG charts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["markdown_report", "write_charts", "write_report", "remove_stale_charts", "CHART_FILES", "fmt_s",
           "fmt_bytes"]

# The PNG files write_charts makes (paths key -> file name, in the output directory) and their captions.
CHART_FILES = {"chart_layers": "layers.png", "chart_network": "network.png"}
_CHART_CAPTIONS = {"chart_layers": "Per-layer estimated time, speed-up and bytes moved",
                   "chart_network": "Whole-network time, bytes moved and model file size"}


def fmt_s(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _target_lines(compiled) -> list[str]:
    t = compiled.target
    p = t.params
    if t.kind == "aie2":
        r, c = p["array"]
        return [f"AIE2 array {r}x{c} at {p['clock_ghz']} GHz, {p['macs_per_cycle']} MACs/cycle per core, "
                f"{p['core_memory_kib']} KiB per core, {p['memtile_kib']} KiB memory tile per column, "
                f"{c * p['ddr_channels_per_column']:g} DDR channels ({p['ddr_load_gbps']} GB/s load, "
                f"{p['ddr_write_gbps']} GB/s write each), memtile<->core {p['core_load_gbps']}/{p['core_write_gbps']} "
                f"GB/s per core, {p['dtype_bytes']}-byte data. Time per layer: time series over its sub-volumes, "
                f"sum of max(load, compute, write) (load + compute + write for a single step). "
                f"'Moved' = bytes between DDR and the memory tiles."]
    if t.kind == "gpu":
        return [f"GPU roofline ({p['device']}): {p['dense_tflops']} TFLOPS dense, {p['sparse_24_tflops']} TFLOPS 2:4, "
                f"{p['memory_gbps']} GB/s, efficiency {p['efficiency']} dense / {p['sparse_efficiency']} 2:4 / "
                f"{p['block_sparse_efficiency']} of dense for 8x8 blocks. 'Moved' = bytes to and from memory."]
    return [f"CPU model calibrated on: {p['machine']} ({p['threads']} thread(s), {p.get('measured', 'date unknown')}). "
            f"Sparse layers run the native 8x8 block kernel where it was measured faster; 'measured' columns "
            f"come from timing this machine at compile time. 'Moved' = bytes read and written in memory."]


def markdown_report(compiled, charts: dict | None = None) -> str:
    """The report text; ``charts`` (write_charts' paths) adds a Charts section linking them relatively."""
    tot = compiled.totals()
    t = compiled.target
    measured = any(p.measured for p in compiled.layers)
    headers = ["#", "layer", "shape", "format", "stored / dense", "est. dense", "est. compiled", "speed-up",
               "moved dense -> compiled", "steps", "runs"]
    if measured:
        headers[-1:-1] = ["measured dense", "measured sparse"]
    rows = []
    for i, p in enumerate(compiled.layers):
        e = p.estimate
        tiles = e.tiles
        steps = (f"{e.iterations} ({tiles.get('w', 1)}W x {tiles.get('co', 1)}Co x {tiles.get('ci', 1)}Ci)"
                 if tiles else str(e.iterations))
        row = [i, f"`{p.name}`", p.spec.describe(), p.format.label,
               f"{fmt_bytes(p.stored_bytes)} / {fmt_bytes(p.dense_bytes)}", fmt_s(e.dense_time_s), fmt_s(e.time_s),
               f"{e.speedup:.2f}x", f"{fmt_bytes(e.dense_bytes_moved)} -> {fmt_bytes(e.bytes_moved)}", steps,
               p.decision]
        if measured:
            m = p.measured or {}
            row[-1:-1] = [fmt_s(m["dense_s"]) if m else "", fmt_s(m["sparse_s"]) if m else ""]
        rows.append(row)
    notes = [f"- `{p.name}`: {'; '.join(p.notes)}" for p in compiled.layers if p.notes]
    parts = [f"# Compiled model: {compiled.source or 'model'}", "",
             f"Target: **{t.label}** (profile {t.source}); example input {tuple(compiled.input_shape)}; "
             f"block {compiled.block[0]}x{compiled.block[1]}.", "", *_target_lines(compiled), "",
             "## Whole network", "",
             _table(["", "dense", "compiled", "ratio"], [
                 ["estimated time (conv/linear layers)", fmt_s(tot["dense_time_s"]), fmt_s(tot["time_s"]),
                  f"{tot['speedup']:.2f}x faster"],
                 ["bytes moved", fmt_bytes(tot["dense_bytes_moved"]), fmt_bytes(tot["bytes_moved"]),
                  f"{tot['bytes_moved'] / max(tot['dense_bytes_moved'], 1):.2f}"],
                 ["conv/linear weights stored", fmt_bytes(tot["dense_weight_bytes"]), fmt_bytes(tot["weight_bytes"]),
                  f"{tot['weight_bytes'] / max(tot['dense_weight_bytes'], 1):.2f}"],
                 ["model file tensors (all)", fmt_bytes(tot["dense_file_bytes"]), fmt_bytes(tot["file_bytes"]),
                  f"{tot['file_ratio']:.2f}"]]),
             "", f"{tot['sparse_layers']} of {tot['layers']} layers are sparse. Layers other than Conv2d/Linear "
                 f"(pooling, normalisation, activations) are not estimated.", "",
             "## Layers", "", _table(headers, rows)]
    if notes:
        parts += ["", "## Notes", "", *notes]
    linked = [k for k in CHART_FILES if charts and charts.get(k)]
    if linked:
        # Relative links: the charts sit next to report.md, so the directory can be moved or published.
        parts += ["", "## Charts", ""]
        for k in linked:
            parts += [f"![{_CHART_CAPTIONS[k]}]({Path(charts[k]).name})", ""]
        parts.pop()
    return "\n".join(parts)


def remove_stale_charts(out_dir) -> list[str]:
    """Delete the chart PNGs (CHART_FILES names only) left in ``out_dir`` by an earlier run; returns them."""
    removed = []
    for name in CHART_FILES.values():
        path = Path(out_dir) / name
        if path.is_file():
            path.unlink()
            removed.append(str(path))
    return removed


def write_report(compiled, out_dir, charts: bool = True, name: str = "report.md") -> dict:
    """Write ``name`` and, with ``charts``, the PNG charts it links; returns {"report": path, chart keys: paths}.

    Without ``charts``, chart PNGs from an earlier run in ``out_dir`` are removed so that the
    directory does not show charts of another model next to this report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if charts:
        paths.update(write_charts(compiled, out))
    else:
        remove_stale_charts(out)
    note = paths.pop("charts_note", None)
    text = markdown_report(compiled, charts=paths)
    if note:
        text += "\n\n" + note
    paths["report"] = str(out / name)
    Path(paths["report"]).write_text(text + "\n")
    return paths


# matplotlib is the optional [plot] extra: without it the report says (and nmsparse compile prints) how to get charts.
CHARTS_SKIPPED = "Charts skipped: matplotlib is not installed (pip install 'nmsparse[plot]' to get them)."


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LAYER_ROW_IN = 0.2  # inches of figure height per layer in layers.png
LAYERS_MAX_HEIGHT_IN = 60.0  # past this (about 300 layers) every k-th layer name is shown instead


def layers_figure(compiled):
    """layers.png's figure: one row per layer (named, in call order, top down) in three panels side by side.

    Horizontal bars keep every layer's name readable at any depth: the figure grows by LAYER_ROW_IN per
    layer, and only past LAYERS_MAX_HEIGHT_IN are the names thinned to every k-th one.
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    L = compiled.layers
    n = len(L)
    y = np.arange(n)
    dense = np.array([p.estimate.dense_time_s for p in L])
    comp = np.array([p.estimate.time_s for p in L])
    speed = dense / np.maximum(comp, 1e-15)
    bd = np.array([p.estimate.dense_bytes_moved for p in L], dtype=float)
    bc = np.array([p.estimate.bytes_moved for p in L], dtype=float)
    # Units that keep the tick labels short: ms or us, MB or kB.
    t_unit, t_scale = ("ms", 1e3) if max(dense.max(initial=0), comp.max(initial=0)) >= 1e-4 else ("us", 1e6)
    b_unit, b_scale = ("MB", 1e-6) if max(bd.max(initial=0), bc.max(initial=0)) >= 1e5 else ("kB", 1e-3)
    dense, comp, bd, bc = dense * t_scale, comp * t_scale, bd * b_scale, bc * b_scale
    rows_in = n * LAYER_ROW_IN
    every = max(1, int(np.ceil(rows_in / (LAYERS_MAX_HEIGHT_IN - 2))))
    height = min(max(4.0, rows_in + 2), LAYERS_MAX_HEIGHT_IN)
    fig, axes = plt.subplots(1, 3, figsize=(13, height), sharey=True, layout="constrained",
                             gridspec_kw={"width_ratios": [1.2, 1, 1.2]})
    h = 0.4
    axes[0].barh(y - h / 2, dense, h, label="dense", color="C7")
    axes[0].barh(y + h / 2, comp, h, label="compiled", color="C0")
    axes[0].set(xlabel=f"estimated {t_unit}", title="time")
    axes[1].barh(y, speed, 0.7, color=["C2" if s >= 1 else "C3" for s in speed])
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set(xlabel="speed-up (x)", title="speed-up (dense / compiled)")
    axes[2].barh(y - h / 2, bd, h, label="dense", color="C7")
    axes[2].barh(y + h / 2, bc, h, label="compiled", color="C0")
    axes[2].set(xlabel=f"{b_unit} moved", title="bytes moved")
    shown = y[::every]
    axes[0].set_yticks(shown, [f"{L[i].name}" for i in shown], fontsize=7)
    axes[0].set_ylim(n - 0.5, -0.5)  # call order, first layer at the top
    axes[0].set_ylabel("layer (call order)" + (f", every {every}th named" if every > 1 else ""))
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Per layer on {compiled.target.label}", fontsize=10)
    return fig


def write_charts(compiled, out_dir) -> dict:
    """layers.png (per-layer time, speed-up, bytes moved) and network.png; {} plus a note without matplotlib."""
    try:
        plt = _plt()
    except ImportError:
        remove_stale_charts(out_dir)  # the report will not link them: do not leave another run's charts
        return {"charts_note": CHARTS_SKIPPED}
    out = Path(out_dir)
    fig = layers_figure(compiled)
    p1 = out / CHART_FILES["chart_layers"]
    fig.savefig(p1, dpi=100)
    plt.close(fig)

    tot = compiled.totals()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    axes[0].bar(["dense", "compiled"], [tot["dense_time_s"] * 1e3, tot["time_s"] * 1e3], color=["C7", "C0"])
    axes[0].set(ylabel="estimated ms", title=f"whole network: {tot['speedup']:.2f}x")
    axes[1].bar(["dense", "compiled"], [tot["dense_bytes_moved"] / 1e6, tot["bytes_moved"] / 1e6], color=["C7", "C0"])
    axes[1].set(ylabel="MB moved", title="bytes moved")
    axes[2].bar(["dense", "compact"], [tot["dense_file_bytes"] / 1e6, tot["file_bytes"] / 1e6], color=["C7", "C0"])
    axes[2].set(ylabel="MB", title=f"model file ({tot['file_ratio']:.2f} of dense)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{compiled.source or 'model'} on {compiled.target.label}", fontsize=10)
    fig.tight_layout()
    p2 = out / CHART_FILES["chart_network"]
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return {"chart_layers": str(p1), "chart_network": str(p2)}
