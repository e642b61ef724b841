"""Several configs (or a sweep) times several seeds: a table like SDGP's README and a PNG of curves."""

from __future__ import annotations

import copy
import csv
import math
import statistics
from pathlib import Path

from .checkpoint import check_resume, load_resumable, previous_path
from .config import apply_overrides, config_from_dict, load_config, restate_sparsity
from .distributed import is_main_process
from .loop import CHECKPOINT, pattern_label, read_run, train
from .plots import PLOTS_SKIPPED, can_plot, plot_curves


def expand_sweeps(base: dict, sweeps: list[str]) -> list[dict]:
    """`key=v1,v2,...` per sweep (a key ending in `.nm` takes 'n:m' values); the cross product of all.

    A run's name says the swept value: the N:M, method or block sparsity its name states is replaced
    ('fmnist SDGP rescale 2:4' swept over grad.nm=1:4 is 'fmnist SDGP rescale 1:4'); otherwise `key=value` is
    appended (its last part, or for sparsity keys its section: 'digits dense grad.nm=1:4').
    """
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
                name = str(v.get("name", "run"))
                if key == "sparsity" or key.startswith("sparsity."):
                    name, complete = restate_sparsity(name, v, d)
                    if not complete:
                        name = f"{name} {key.removeprefix('sparsity.')}={value}"
                else:
                    name = f"{name} {key.split('.')[-1]}={value}"
                d["name"] = name
                out.append(d)
        variants = out
    return variants


def slug(text: str) -> str:
    """A directory name for a run name: letters, digits and -_. only, lower case ('run' when nothing is left)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-").lower() or "run"


def distinct_names(configs: list[dict], paths: list[str]) -> list[dict]:
    """Configs whose names would share a run directory get their file's stem appended, e.g. 'digits dense (lr05)'.

    ValueError when that does not separate them (the same file twice, or equal names and equal file names).
    """
    out = [dict(d) for d in configs]
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(configs):
        groups.setdefault(slug(str(d.get("name", "run"))), []).append(i)
    for idx in groups.values():
        if len(idx) > 1:
            for i in idx:
                out[i]["name"] = f"{configs[i].get('name', 'run')} ({Path(paths[i]).stem})"
    seen: dict[str, int] = {}
    for i, d in enumerate(out):
        j = seen.setdefault(slug(d["name"]), i)
        if j != i:
            what = "are the same file" if Path(paths[i]).resolve() == Path(paths[j]).resolve() else \
                "have the same name and the same file name"
            raise ValueError(f"{paths[j]} and {paths[i]} {what}, so their runs would share one directory "
                             f"({slug(d['name'])}/): give each config its own `name:` (or compare each once)")
    return out


def plan_runs(configs: list[dict], seeds: int, out_dir: str | Path, resume: bool = True) -> list[list[tuple]]:
    """Validate every config and seed before any training: per config, its (TrainConfig, run directory) per seed.

    Refuses two configs that would share a run directory, and existing checkpoints that cannot be resumed.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a whole number >= 1 (seeds 0..k-1 are trained), got {seeds!r}")
    out_dir = Path(out_dir)
    plan, owner = [], {}
    for i, d in enumerate(configs):
        runs = []
        for seed in range(seeds):
            try:
                cfg = config_from_dict({**d, "seed": d.get("seed", 0) + seed})
            except ValueError as e:
                raise ValueError(f"{e} (config {i + 1}, {d.get('name', 'run')!r})") from None
            runs.append((cfg, out_dir / slug(cfg.name) / f"seed{seed}"))
        key = slug(runs[0][0].name)
        if key in owner:
            raise ValueError(f"configs {owner[key][0] + 1} ({owner[key][1]!r}) and {i + 1} ({runs[0][0].name!r}) "
                             f"would both train in {out_dir / key}/: give each its own `name`")
        owner[key] = (i, runs[0][0].name)
        plan.append(runs)
    if resume:
        for runs in plan:
            for cfg, run_dir in runs:
                ckpt = run_dir / CHECKPOINT
                if ckpt.exists() or previous_path(ckpt).exists():
                    state, used, _ = load_resumable(ckpt)
                    check_resume(used, state, cfg.to_dict())
    return plan


def nm_columns(cfg) -> tuple[str, str]:
    """('weight N:M', 'SDGP grad N:M') cells: '2:4', '4:8-T', the pattern of block weights ('block 8x8 50%'),
    '-' for none."""
    s = cfg.sparsity
    w = g = "-"
    if s is not None and s.weight is not None:
        w = s.weight
        w = f"block {w.block[0]}x{w.block[1]} {w.sparsity:.0%}" if hasattr(w, "block") else \
            f"{w.n}:{w.m}{'-T' if w.transposable else ''}"
    if s is not None and s.grad is not None:
        g = f"{s.grad.n}:{s.grad.m}"
    return w, g


def run_compare(configs: list[dict], seeds: int, out_dir: str | Path, log=print, resume: bool = True) -> list[dict]:
    """Train every config with seeds 0..seeds-1 into out_dir/<name>/seed<k>; returns one row per config.

    Everything is checked first (configs, run directories, existing checkpoints), so a mistake in the last
    config fails before the first one trains.
    """
    out_dir = Path(out_dir)
    rows, curves = [], {}
    for runs in plan_runs(configs, seeds, out_dir, resume):
        accs, histories = [], []
        for cfg, run_dir in runs:
            summary = train(cfg, run_dir, resume=resume, log=log)
            accs.append(summary["final"])
            metric = summary.get("metric", "test_acc")
            histories.append(read_run(run_dir)["metrics"])
        weight_nm, grad_nm = nm_columns(cfg)
        rows.append({"name": cfg.name, "pattern": pattern_label(cfg), "weight_nm": weight_nm, "grad_nm": grad_nm,
                     "metric": metric, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seeds": len(accs), "accs": accs})
        curves[cfg.name] = histories
    if is_main_process():
        write_outputs(rows, curves, out_dir, log)
    return rows


def format_table(rows: list[dict]) -> str:
    """The Markdown table: one row per config, the headline metric's mean +- std over seeds (top-1 accuracy, or
    validation loss and perplexity for language models)."""
    text = any(r.get("metric") == "val_loss" for r in rows)
    label = "val loss (nats/char) mean +- std | perplexity" if text else "top-1 (%) mean +- std"
    lines = [f"| run | pattern | weight N:M | SDGP grad N:M | {label} | seeds |",
             "|---|---|---|---|---|---|" + ("---|" if text else "")]
    for r in rows:
        value = f"{r['mean']:.2f} +- {r['std']:.2f}"
        if text:
            value = f"{r['mean']:.4f} +- {r['std']:.4f} | {math.exp(r['mean']):.2f}"
        lines.append(f"| {r['name']} | {r['pattern']} | {r['weight_nm']} | {r['grad_nm']} | {value} | {r['seeds']} |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], curves: dict, out_dir: Path, log=print) -> None:
    """compare.md, compare.csv and (with matplotlib; else one line says how to get it) compare.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(format_table(rows) + "\n")
    with open(out_dir / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "pattern", "weight_nm", "grad_nm", "metric", "mean", "std", "seeds", "values"])
        for r in rows:
            w.writerow([r["name"], r["pattern"], r["weight_nm"], r["grad_nm"], r.get("metric", "test_acc"),
                        f"{r['mean']:.4f}", f"{r['std']:.4f}", r["seeds"], " ".join(f"{a:.4f}" for a in r["accs"])])
    if can_plot():
        plot_curves(curves, out_dir / "compare.png", title="nmsparse compare")
    else:
        (out_dir / "compare.png").unlink(missing_ok=True)  # an earlier run's plot would not show these rows
        log(PLOTS_SKIPPED)


def load_config_dicts(paths: list[str], overrides: list[str]) -> list[dict]:
    """Validated config dicts for each file, with the --set overrides applied."""
    out = []
    for p in paths:
        cfg = load_config(p, overrides)  # validates, with the file named in errors
        out.append(cfg.to_dict())
    return out
