"""docs/gpu-h200-cslt.png from a gpu_probe.py result: 2:4 GEMM speed vs dense, eager calls and CUDA-graph replays.

Usage: python scripts/plot_gpu_probe.py gpu-probe.json docs/gpu-h200-cslt.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    r = json.load(open(src))
    rows = [x for x in r["cslt"] if x["call"] == "2:4 torch._cslt_sparse_mm"]
    eager, graph = [x["event_x"] for x in rows], [x["graph_x"] for x in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], eager, 0.4, label="one call at a time (eager)")
    ax.bar([i + 0.2 for i in xs], graph, 0.4, label="20 calls replayed from a CUDA graph")
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.text(len(rows) - 0.5, 1.02, "dense", ha="right", va="bottom")
    for i, (a, b) in enumerate(zip(eager, graph)):
        ax.text(i - 0.2, a + 0.02, f"{a:.2f}", ha="center", fontsize=8)
        ax.text(i + 0.2, b + 0.02, f"{b:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{x['shape']}\n{x['mnk']}" for x in rows], fontsize=8)
    ax.set_ylim(0, 1.8)
    ax.set_ylabel("speed vs dense bf16 GEMM (x)")
    ax.set_title(f"2:4 GEMM (weight pre-compressed) on an {r['gpu'].replace('NVIDIA ', '')}, torch "
                 f"{r['torch'].split('+')[0]}, cuSPARSELt {r['cusparselt']}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
