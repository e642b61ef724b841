"""Several configs (or a sweep) times several seeds: a table like SDGP's README and a PNG of curves."""

from __future__ import annotations

import copy
import csv
import statistics
from pathlib import Path

from .config import apply_overrides, config_from_dict, load_config
from .loop import pattern_label, read_run, train
from .plots import plot_curves


def expand_sweeps(base: dict, sweeps: list[str]) -> list[dict]:
    """`key=v1,v2,...` per sweep (a key ending in `.nm` takes 'n:m' values); the cross product of all."""
    variants = [base]
    for sweep in sweeps:
        if "=" not in sweep:
            raise ValueError(f"--sweep expects key=v1,v2,..., got {sweep!r}")
        key, values = sweep.split("=", 1)
        out = []
        for v in variants:
            for value in values.split(","):
                if key.endswith(".nm"):
                    n, _, m = value.partition(":")
                    parent = key[: -len(".nm")]
                    sets = [f"{parent}.n={n}", f"{parent}.m={m}"]
                else:
                    sets = [f"{key}={value}"]
                d = apply_overrides(copy.deepcopy(v), sets)
                d["name"] = f"{v.get('name', 'run')} {key.split('.')[-1]}={value}"
                out.append(d)
        variants = out
    return variants


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-").lower()


def run_compare(configs: list[dict], seeds: int, out_dir: str | Path, log=print) -> list[dict]:
    """Train every config with seeds 0..seeds-1 into out_dir/<name>/seed<k>; returns one row per config."""
    out_dir = Path(out_dir)
    rows, curves = [], {}
    for d in configs:
        accs, histories = [], []
        for seed in range(seeds):
            cfg = config_from_dict({**d, "seed": d.get("seed", 0) + seed})
            run_dir = out_dir / slug(cfg.name) / f"seed{seed}"
            summary = train(cfg, run_dir, log=log)
            accs.append(summary["final_test_acc"])
            histories.append(read_run(run_dir)["metrics"])
        s = cfg.sparsity
        nm = (s.grad or s.weight) if s is not None else None
        rows.append({"name": cfg.name, "pattern": pattern_label(cfg),
                     "N": getattr(nm, "n", "-"), "M": getattr(nm, "m", "-"),
                     "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seeds": len(accs), "accs": accs})
        curves[cfg.name] = histories
    write_outputs(rows, curves, out_dir)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| run | pattern | N | M | top-1 (%) mean +- std | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['pattern']} | {r['N']} | {r['M']} | "
                     f"{r['mean']:.2f} +- {r['std']:.2f} | {r['seeds']} |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], curves: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(format_table(rows) + "\n")
    with open(out_dir / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "pattern", "N", "M", "mean", "std", "seeds", "accuracies"])
        for r in rows:
            w.writerow([r["name"], r["pattern"], r["N"], r["M"], f"{r['mean']:.3f}", f"{r['std']:.3f}",
                        r["seeds"], " ".join(f"{a:.2f}" for a in r["accs"])])
    plot_curves(curves, out_dir / "compare.png", title="nmsparse compare")


def load_config_dicts(paths: list[str], overrides: list[str]) -> list[dict]:
    """Validated config dicts for each file, with the --set overrides applied."""
    out = []
    for p in paths:
        cfg = load_config(p, overrides)  # validates, with the file named in errors
        out.append(cfg.to_dict())
    return out
