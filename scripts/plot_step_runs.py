"""Plot several `nmsparse bench step` runs of one model and mode side by side: each run's ratio to dense as a dot,
the mean of the runs as a bar, the issue's target marked. Usage:

    python scripts/plot_step_runs.py OUT.png "TITLE" LABEL=runs/a/step.csv LABEL=runs/b/step.csv ...
"""

from __future__ import annotations

import csv
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ratio(row: dict) -> float:
    """The ratio the target is on: the mean (amortised) for the periodic methods, else the median."""
    return float(row["ratio_mean" if row["target_on"] == "mean" else "ratio_median"])


def main(out: str, title: str, runs: list[str]) -> None:
    labels, tables = [], []
    for arg in runs:
        label, path = arg.split("=", 1)
        labels.append(label)
        tables.append({r["method"]: r for r in csv.DictReader(open(path))})
    methods = list(dict.fromkeys(m for t in tables for m in t))
    fig, ax = plt.subplots(figsize=(7, 0.34 * len(methods) + 1.8))
    for y, m in enumerate(methods):
        vals = [ratio(t[m]) for t in tables if m in t]
        target = next((float(t[m]["target"]) for t in tables if m in t and t[m]["target"]), None)
        mean = statistics.fmean(vals)
        ax.barh(y, mean, color="0.6" if target is None else "C2" if mean <= target else "C1", alpha=0.6)
        for k, t in enumerate(tables):
            if m in t:
                ax.scatter(ratio(t[m]), y, marker="os^Dv"[k % 5], color="black", s=18, zorder=3,
                           label=labels[k] if y == 0 else None)
        if target is not None:
            ax.scatter(target, y, marker="|", s=260, linewidths=2.5, color="C3", zorder=4)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_ylim(len(methods) - 0.5, -0.5)
    ax.set_xlim(0.8, None)
    ax.set_xlabel("step time / dense step time, same run (bars: mean of runs; red: target)", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
