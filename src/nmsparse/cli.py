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
    text = "\n\n".join([f"machine: {result['machine']}"] + [f"## {k}\n\n{v}" for k, v in result["tables"].items()])
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


def _demo(args) -> int:
    from . import demo

    demo.main(seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nmsparse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="compute every pattern for a real trained weight and print a summary")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="benchmarks that compare against a baseline measured in the same run")
    bsub = b.add_subparsers(dest="suite", required=True)
    bp = bsub.add_parser("patterns", help="mask computation times on 1024^2 and 4096^2 float32 weights")
    bp.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    bp.add_argument("--quick", action="store_true", help="small sizes only (256, 1024)")
    bp.add_argument("--baseline-tiles", type=int, default=400, help="tiles solved by OR-tools for the baseline")
    bp.add_argument("--budget", type=float, default=5.0, help="seconds of repeats per timed case")
    bp.add_argument("--out", help="also write the tables (Markdown) and a JSON copy here")
    bp.set_defaults(func=_bench_patterns)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
