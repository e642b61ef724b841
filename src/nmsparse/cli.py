"""The `nmsparse` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _bench_patterns(args) -> int:
    from .bench import patterns

    sizes = (256, 1024) if args.quick else tuple(args.sizes)
    result = patterns.run(sizes=sizes, baseline_tiles=args.baseline_tiles, budget_s=args.budget)
    return _print_tables(result, [f"machine: {result['machine']}"], args.out)


def _print_tables(result: dict, head: list[str], out) -> int:
    """Print a suite's tables under `head`; with --out also write them (Markdown) and the result (JSON)."""
    text = "\n\n".join(head + [f"## {k}\n\n{v}" for k, v in result["tables"].items()])
    print("\n" + text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        Path(out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


def _bench_transposable(args) -> int:
    from .bench import transposable

    nm = [_parse_nm(x) for x in args.nm]
    result = transposable.run(size=args.size, nm=nm, repeats=args.repeats, budget_s=args.budget,
                              ortools_tiles=args.ortools_tiles)
    return _print_tables(result, [f"machine: {result['machine']}", result["note"]], args.out)


def _bench_prune(args) -> int:
    from .bench import prune

    n, m = _parse_nm(args.nm)
    result = prune.run(n=n, m=m, repeats=args.repeats, threads=args.threads, quick=args.quick)
    return _print_tables(result, [f"machine: {result['machine']}", result["note"]], args.out)


def _parse_nm(text: str) -> tuple[int, int]:
    n, sep, m = text.partition(":")
    if not sep or not n.isdigit() or not m.isdigit() or not 0 < int(n) < int(m):
        raise ValueError(f"--nm takes N:M with 0 < N < M, e.g. 4:8; got {text!r}")
    return int(n), int(m)


def _bench_gpu(args) -> int:
    from .bench import gpu

    sections = [s.strip() for s in args.sections.split(",")] if args.sections else None
    bad = sorted(set(sections or ()) - set(gpu.SECTIONS))
    if bad:
        raise SystemExit(f"--sections: unknown {', '.join(bad)}; choose from {','.join(gpu.SECTIONS)}")
    results = gpu.run(out=args.out, quick=args.quick, sections=sections)
    return 1 if results["errors"] else 0


def _demo(args) -> int:
    from . import demo

    demo.main(seed=args.seed)
    return 0


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _is_main_process() -> bool:
    """False on the ranks other than 0 under torchrun: one process prints the result."""
    from .train.distributed import is_main_process

    return is_main_process()


def _train(args) -> int:
    from .train.compare import format_table, run_compare
    from .train.config import load_config
    from .train.defaults import default_configs
    from .train.loop import train

    if args.config is None:
        from .train.config import apply_overrides, name_sparsity_overrides

        out = Path(args.out or "runs/default")
        configs = [name_sparsity_overrides(apply_overrides(d, args.set), args.set, d) for d in default_configs()]
        if _is_main_process():
            print(f"No --config: the embedded default, {len(configs)} runs on scikit-learn's digits -> {out}/")
        rows = run_compare(configs, 1, out, resume=not args.restart)
        if _is_main_process():
            print("\n" + format_table(rows))
            plot = (out / "compare.png").exists()
            print(f"\nTable, CSV{' and accuracy plot' if plot else ''}: {out}/compare.md, compare.csv"
                  + (", compare.png" if plot else ""))
        return 0
    cfg = load_config(args.config, args.set)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    summary = train(cfg, out, resume=not args.restart)
    if _is_main_process():
        if summary["metric"] == "val_loss":
            result = (f"final validation loss {summary['final']:.4f} nats/char, perplexity "
                      f"{summary['final_val_ppl']:.2f} (best loss {summary['best']:.4f})")
        else:
            result = f"final test top-1 {summary['final']:.2f}% (best {summary['best']:.2f}%)"
        print(f"\n{cfg.name}: {result}; run directory {out}/")
    return 0


def _compare(args) -> int:
    from .train.compare import distinct_names, expand_sweeps, format_table, load_config_dicts, run_compare

    configs = []
    for d in distinct_names(load_config_dicts(args.configs, args.set), args.configs):
        configs += expand_sweeps(d, args.sweep)
    rows = run_compare(configs, args.seeds, args.out, resume=not args.restart)
    if _is_main_process():
        print("\n" + format_table(rows))
        plot = ", compare.png" if (Path(args.out) / "compare.png").exists() else ""
        print(f"\nSaved {args.out}/compare.md, compare.csv{plot}")
    return 0


def _eval(args) -> int:
    from .train.evaluate import evaluate_checkpoint

    path = Path(args.checkpoint)
    if path.suffix == ".safetensors" or (path.is_dir() and (path / "model.safetensors").exists()):
        from .compile.load import evaluate_compiled

        res = evaluate_compiled(path, backend=args.backend)
        print(f"{path}: test top-1 {res['test_acc']:.2f}%, test loss {res['test_loss']:.4f} ({res['name']}; compact "
              f"model for {res['target']}, {res['sparse_layers']} of {res['layers']} layers on the block-sparse CPU "
              f"kernel)")
        return 0
    res = evaluate_checkpoint(args.checkpoint, device=args.device)
    if "val_loss" in res:
        print(f"{args.checkpoint}: validation loss {res['val_loss']:.4f} nats/char, perplexity {res['val_ppl']:.2f}, "
              f"next-character accuracy {res['val_acc']:.2f}% ({res['name']}, epoch {res['epoch']})")
        return 0
    print(f"{args.checkpoint}: test top-1 {res['test_acc']:.2f}%, test loss {res['test_loss']:.4f} "
          f"({res['name']}, epoch {res['epoch']})")
    return 0


def _report(args) -> int:
    from .train.evaluate import report_run

    print(report_run(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .common import __version__

    p = argparse.ArgumentParser(prog="nmsparse", description=__doc__)
    p.add_argument("--version", action="version", version=f"nmsparse {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="compute every pattern for a real trained weight and print a summary")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train from a YAML config (no config: the embedded digits default)")
    t.add_argument("--config", help="YAML config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--restart", action="store_true",
                   help="ignore an existing checkpoint in --out (it is overwritten only at the next epoch end)")
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", help="several configs (or a sweep) x seeds: mean +- std table and a plot")
    c.add_argument("configs", nargs="+")
    c.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..k-1 per config (default 3)")
    c.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="e.g. --sweep sparsity.grad.nm=1:4,2:4,4:8 (repeatable: cross product)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--restart", action="store_true",
                   help="ignore existing checkpoints under --out (each is replaced only at its run's next epoch end)")
    c.set_defaults(func=_compare)

    e = sub.add_parser("eval", help="test accuracy of a checkpoint, or of a compiled model run block-sparse on the CPU")
    e.add_argument("checkpoint", help="checkpoint.pt (nmsparse train / prune), or a compact model.safetensors or the "
                                      "directory nmsparse compile wrote")
    e.add_argument("--device", default="auto", help="for checkpoints: auto, cpu, cuda (compact models run on the CPU)")
    e.add_argument("--backend", choices=["auto", "native", "torch"], default="auto",
                   help="block-sparse CPU kernel for compact models")
    e.set_defaults(func=_eval)

    r = sub.add_parser("report", help="metrics, sparsity report and plots of a run directory")
    r.add_argument("run_dir")
    r.set_defaults(func=_report)

    from .compile.cli import add_compile_arguments, compile_command

    cp = sub.add_parser("compile", help="compact block/N:M model file, per-layer plan and estimated time for a target")
    add_compile_arguments(cp)
    cp.set_defaults(func=compile_command)

    from .prune.command import add_prune_arguments, prune_command

    pr = sub.add_parser("prune", help="one-shot N:M / 4:8-T / block pruning of a trained checkpoint, with AdaPrune")
    add_prune_arguments(pr)
    pr.set_defaults(func=prune_command)

    from .train.fidelity import add_fidelity_arguments, fidelity_command

    fi = sub.add_parser("fidelity", help="how far each gradient-pruning method moves dX and dW from dense backprop")
    add_fidelity_arguments(fi)
    fi.set_defaults(func=fidelity_command)

    b = sub.add_parser("bench", help="benchmarks that compare against a baseline measured in the same run")
    bsub = b.add_subparsers(dest="suite", required=True)
    bp = bsub.add_parser("patterns", help="mask computation times on 1024^2 and 4096^2 float32 weights")
    bp.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    bp.add_argument("--quick", action="store_true", help="small sizes only (256, 1024)")
    bp.add_argument("--baseline-tiles", type=int, default=400, help="tiles solved by OR-tools for the baseline")
    bp.add_argument("--budget", type=float, default=5.0, help="seconds of repeats per timed case")
    bp.add_argument("--out", help="also write the tables (Markdown) and a JSON copy here")
    bp.set_defaults(func=_bench_patterns)
    bt = bsub.add_parser("transposable", help="the compiled exact transposable solver vs PyTorch's and OR-tools'")
    bt.add_argument("--size", type=int, default=4096, help="the weight is size x size float32")
    bt.add_argument("--nm", nargs="+", default=["4:8", "8:16", "16:32"], help="N:M patterns (default 4:8 8:16 16:32)")
    bt.add_argument("--repeats", type=int, default=5, help="timed runs of the compiled solver (median)")
    bt.add_argument("--budget", type=float, default=60.0,
                    help="seconds the PyTorch solver may take per N:M; beyond it, a band of 1024 rows, extrapolated")
    bt.add_argument("--ortools-tiles", type=int, default=2000, help="tiles solved by OR-tools, extrapolated")
    bt.add_argument("--out", help="also write the tables (Markdown) and a JSON copy here")
    bt.set_defaults(func=_bench_transposable)
    bq = bsub.add_parser("prune", help="SDGP gradient pruning and SR-STE masks on the CPU: the C++ kernel vs torch")
    bq.add_argument("--nm", default="2:4", help="the N:M pattern (default 2:4)")
    bq.add_argument("--repeats", type=_positive_int, default=9, help="timed calls per case (median)")
    bq.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    bq.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    bq.add_argument("--out", help="also write the tables (Markdown) and a JSON copy here")
    bq.set_defaults(func=_bench_prune)
    bg = bsub.add_parser("gpu", help="Triton prune kernels and 2:4 sparse tensor cores vs dense (needs CUDA)")
    bg.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    bg.add_argument("--out", help="write JSON (and Markdown beside it) here")
    bg.add_argument("--sections", help="comma-separated subset of roofs,prune,gemm,block,train (default: all)")
    bg.set_defaults(func=_bench_gpu)
    from .bench.deploy import add_deploy_arguments, deploy_main

    bd = bsub.add_parser("deploy", help="block-sparse CPU execution vs dense per layer, against the cpu profile")
    add_deploy_arguments(bd)
    bd.set_defaults(func=deploy_main)
    from .bench.step_report import add_step_arguments, step_main

    bs = bsub.add_parser("step", help="training-step time of each sparsity method against dense, eager and compiled")
    add_step_arguments(bs)
    bs.set_defaults(func=step_main)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as e:  # bad input: one line, no traceback
        print(f"nmsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (training says where its last checkpoint is), exit 130
        if _is_main_process():
            print(f"\nnmsparse {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
