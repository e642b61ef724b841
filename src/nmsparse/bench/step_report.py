"""`nmsparse bench step`'s command: options, the Markdown table, step.md / step.csv / step.png."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ..common.system import check_parent_dirs
from ..common.text import markdown_table
from .step import METHODS, MODELS, OPTIMIZERS, StepOptions, run_step_bench

__all__ = ["format_result", "write_outputs", "plot_ratios", "add_step_arguments", "step_main"]

COLUMNS = ["model", "mode", "method", "median ms", "mean ms", "worst ms", "x dense (median)", "x dense (mean)",
           "target", "recompiles", "peak MB", "peak x dense", "RSS MB", "RSS +MB", "mask", "masking", "grad prune",
           "rest", "sparsify s"]
CSV_KEYS = ["model", "mode", "method", "steps", "median_ms", "mean_ms", "worst_ms", "ratio_median", "ratio_lo",
            "ratio_hi", "ratio_mean", "target", "target_on", "meets", "decided", "compiles_warmup", "graph_breaks",
            "recompiles", "peak_mb", "peak_vs_dense", "rss_mb", "rss_vs_dense_mb", "profiled_steps", "share_mask",
            "share_masking", "share_grad_prune", "share_rest", "sparsify_s"]
NOTES = (
    "Ratios: step time over the dense step time of the same run and mode. \"median\": per round, the method's "
    "step over dense's in the same round, the median over rounds, with its 95% confidence interval in brackets "
    "(a target inside it is not decided by this run: \"interval spans it\"); \"mean\": mean over dense's mean, "
    "unpaired, amortised over the timed steps (whole recompute periods). Target: issue #12's ratio, on the "
    "median, or on the mean for the methods that recompute periodically. Recompiles: Dynamo compilations after "
    "warm-up. Peak: tensor bytes of a step (parameters, gradients, buffers, optimizer state and the step's "
    "allocations). RSS: peak resident memory of the process in which the method alone ran a few eager steps "
    "(interpreter and libraries included), and its difference to dense's. mask / masking / grad prune: share of "
    "the profiled eager steps' CPU time in nmsparse's profiler scopes (mask computation, W * mask and SR-STE's "
    "backward, SDGP's gradient pruning); rest: everything else. sparsify s: nmsparse.sparsify's wall time (target "
    "< 0.5 s on ResNet-18). Every timed step: step_times.csv.")


def _f(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _target(r: dict) -> str:
    if r["target"] is None:
        return "-"
    verdict = "yes" if r["meets"] else "NO"
    if r.get("decided") is False:
        verdict += " (interval spans it)"
    return f"<= {r['target']:.2f} ({r['target_on']}): {verdict}"


def _ratio(r: dict) -> str:
    if r.get("ratio_lo") is None or r["method"] == "dense":
        return _f(r["ratio_median"], ".2f")
    return f"{r['ratio_median']:.2f} [{r['ratio_lo']:.2f}, {r['ratio_hi']:.2f}]"


def table(rows: list[dict]) -> str:
    """The Markdown table of the rows of `run_step_bench`."""
    return markdown_table(COLUMNS, [
        [r["model"], r["mode"], r["method"], _f(r["median_ms"], ".1f"), _f(r["mean_ms"], ".1f"),
         _f(r["worst_ms"], ".1f"), _ratio(r), _f(r["ratio_mean"], ".2f"), _target(r),
         _f(r["recompiles"], "d"), _f(r["peak_mb"], ".1f"), _f(r["peak_vs_dense"], ".2f"),
         _f(r["rss_mb"], ".0f"), _f(r["rss_vs_dense_mb"], "+.0f"),
         _f(r["share_mask"], ".1%"), _f(r["share_masking"], ".1%"), _f(r["share_grad_prune"], ".1%"),
         _f(r["share_rest"], ".1%"), _f(r["sparsify_s"], ".3f")] for r in rows])


def format_result(result: dict) -> str:
    """Header lines, the models, the table and what the columns mean."""
    lines = [f"{h}  " for h in result["header"]] + [""] + [f"- {m}" for m in result["models"]]
    return "\n".join(lines) + "\n\n" + table(result["rows"]) + "\n\n" + NOTES


def plot_ratios(rows: list[dict], path: Path) -> None:
    """Horizontal bars of the median ratio to dense per method with its 95% interval, one panel per model and
    mode; dots: the mean (amortised) ratio; a line at 1.0 and each method's target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys((r["model"], r["mode"]) for r in rows))
    n = max(len([r for r in rows if (r["model"], r["mode"]) == g]) for g in groups)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups) + 1.5, 0.32 * n + 2.0), squeeze=False)
    for k, (ax, (model, mode)) in enumerate(zip(axes[0], groups)):
        rs = [r for r in rows if (r["model"], r["mode"]) == (model, mode)]
        ys = list(range(len(rs)))
        colors = ["0.6" if r["meets"] is None else "C2" if r["meets"] else "C1" for r in rs]
        ax.barh(ys, [r["ratio_median"] for r in rs], color=colors)
        ci = [(r, y) for r, y in zip(rs, ys) if r.get("ratio_lo") is not None and r["method"] != "dense"]
        if ci:  # the median's 95% interval
            ax.errorbar([r["ratio_median"] for r, _ in ci], [y for _, y in ci], fmt="none", ecolor="0.25", capsize=2,
                        xerr=[[r["ratio_median"] - r["ratio_lo"] for r, _ in ci],
                              [r["ratio_hi"] - r["ratio_median"] for r, _ in ci]])
        ax.scatter([r["ratio_mean"] for r in rs], ys, color="white", edgecolors="black", s=16, zorder=3)
        tgt = [(r["target"], y) for r, y in zip(rs, ys) if r["target"] is not None]
        ax.scatter([t for t, _ in tgt], [y for _, y in tgt], marker="|", s=260, linewidths=2.5, color="C3", zorder=4)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(ys, [r["method"] for r in rs] if k == 0 else [""] * len(rs))
        ax.set_ylim(len(rs) - 0.5, -0.5)
        ax.set_title(f"{model}, {mode}")
        ax.set_xlabel("step / dense step (bar: median, whisker: 95% CI)")
        ax.set_xlim(left=0)
    handles = [Patch(color="C2", label="target met"), Patch(color="C1", label="target missed"),
               Line2D([], [], marker="o", color="white", markeredgecolor="black", linestyle="", label="mean (amortised)"),
               Line2D([], [], marker="|", color="C3", markersize=12, markeredgewidth=2.5, linestyle="",
                      label="target (issue #12)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path, log=print) -> None:
    """step.md, step.csv, step_times.csv (every timed step) and, with matplotlib (else a line says how to get
    it), step.png in out_dir."""
    from ..train.plots import PLOTS_SKIPPED, can_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "step.md").write_text("# nmsparse bench step\n\n" + format_result(result) + "\n")
    with open(out_dir / "step.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(result["rows"])
    with open(out_dir / "step_times.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "mode", "method", "step", "ms"])  # timed steps in order; step k is in round k // block
        for r in result["rows"]:
            w.writerows([r["model"], r["mode"], r["method"], k, f"{ms:.3f}"] for k, ms in enumerate(r.get("times_ms", ())))
    if can_plot():
        plot_ratios(result["rows"], out_dir / "step.png")
    else:
        (out_dir / "step.png").unlink(missing_ok=True)
        log(PLOTS_SKIPPED)


def _count(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value

    return parse


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def add_step_arguments(p) -> None:
    """Options of `nmsparse bench step` on an argparse parser (defaults: StepOptions's)."""
    d = StepOptions()
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"methods or patterns (dense is always timed): {', '.join(METHODS)}")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both",
                   help="eager, torch.compile(model), or both (default)")
    p.add_argument("--compile-backend", default=d.compile_backend, help="torch.compile backend (default inductor)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="AdamW(fused=True) as nmsparse train makes it (default), or torch's default AdamW")
    p.add_argument("--steps", type=_count(1), help="timed steps per method (default 2 x --recompute-every, >= 20)")
    p.add_argument("--warmup", type=_count(0), default=d.warmup, help="untimed steps per method first (compiles)")
    p.add_argument("--block", type=_count(1), default=d.block,
                   help="steps per method per round (default 1; a fresh random order each round)")
    p.add_argument("--threads", type=_count(1), default=d.threads, help="torch.set_num_threads (default 1)")
    p.add_argument("--flush-denormal", type=_on_off, default=d.flush_denormal, metavar="{on,off}",
                   help="torch.set_flush_denormal for the run (default on, as nmsparse train: a step that meets "
                        "subnormal floats ran up to 4x slower on an x86 CPU)")
    p.add_argument("--recompute-every", type=_count(1), default=d.recompute_every,
                   help="mask recompute interval of the transposable and gradual-block methods (default 40)")
    p.add_argument("--profile-steps", type=_count(0), default=d.profile_steps,
                   help="profiled steps per method (periodic methods: one recompute period); 0: no profile")
    p.add_argument("--rss-steps", type=_count(0), default=d.rss_steps,
                   help="eager steps of each method in its own process for its peak RSS (default 3); 0: no RSS")
    p.add_argument("--sparsify-repeats", type=_count(1), default=d.sparsify_repeats,
                   help="builds whose sparsify time is the median (default 3)")
    for name in ("resnet_width", "resnet_batch", "image_size", "gpt_layers", "gpt_width", "gpt_heads",
                 "gpt_block", "gpt_batch", "gpt_vocab"):
        p.add_argument("--" + name.replace("_", "-"), type=_count(1), default=getattr(d, name), metavar="N",
                       help=f"default {getattr(d, name)}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", metavar="DIR", help="directory for step.md, step.csv, step_times.csv and step.png")


def step_main(args) -> int:
    """`nmsparse bench step`: run, print the table, write --out."""
    keys = [k for k in StepOptions.__dataclass_fields__ if hasattr(args, k)]
    options = StepOptions(**{k: getattr(args, k) for k in keys})  # checks --methods before any work
    out = Path(args.out) if args.out else None
    if out is not None:
        check_parent_dirs(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a directory")
    result = run_step_bench(options)
    print("\n" + format_result(result))
    if out is not None:
        write_outputs(result, out)
        print(f"\nSaved {out}/step.md, step.csv, step_times.csv" + (", step.png" if (out / "step.png").exists() else ""))
    return 0
