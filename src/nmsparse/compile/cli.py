"""`nmsparse compile MODEL --target T --out DIR`: argument parsing and the command body.

``nmsparse.cli`` wires it in with ``add_compile_arguments(sub.add_parser("compile"))`` and
``set_defaults(func=compile_command)``; call ``nmsparse.cli.main(["compile", ...])`` from Python.
"""

from __future__ import annotations

import argparse

from .compiler import compile_to_dir
from .report import CHARTS_SKIPPED, fmt_bytes, fmt_s

__all__ = ["add_compile_arguments", "compile_command"]


def add_compile_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", help="a checkpoint written by `nmsparse train`, or a model name (resnet50, vgg16, "
                                 "small_cnn, ...; random weights, use with --prune)")
    p.add_argument("--target", default="aie2",
                   help="hardware profile: aie2, gpu, cpu, or the path of a YAML profile (default aie2)")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, plan.json, report.md, charts)")
    p.add_argument("--input-shape", help="example input, e.g. 1,3,224,224 (default: from the checkpoint's data "
                                         "or the model name)")
    p.add_argument("--prune", type=float, metavar="FRACTION",
                   help="first zero this fraction of the 8x8 blocks of every conv/linear but the first conv "
                        "(lowest L2 norm), e.g. 0.5")
    p.add_argument("--seed", type=int, default=0, help="random weights of a model name (default 0)")
    p.add_argument("--array", metavar="RxC", help="aie2 core array, e.g. 4x4 (the profile's default otherwise)")
    p.add_argument("--allow-dense", action="store_true",
                   help="compile a model without sparse layers as a dense baseline instead of failing")
    p.add_argument("--on-incompatible", choices=["error", "dense"], default="error",
                   help="a layer with many zeros whose channels the block does not divide: fail (default) or store "
                        "it dense")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--measure", choices=["auto", "yes", "no"], default="auto",
                   help="time dense vs block-sparse per layer on this CPU for the fallback (auto: cpu target only)")
    p.add_argument("--backend", choices=["auto", "native", "torch"], default="auto",
                   help="block-sparse CPU kernel used for measuring")
    p.add_argument("--calibrate", action="store_true",
                   help="cpu target: first measure a cpu profile on this CPU (a few minutes) and cache it "
                        "($XDG_CACHE_HOME/nmsparse, else ~/.cache/nmsparse); later runs use the cached one")
    return p


def _target_for(args):
    """The target to compile for: a cpu profile resolved for this CPU (cache, warning, --calibrate), else the name."""
    import sys

    from .cpu_profile import resolve_cpu_profile
    from .profiles import load_target

    tgt = load_target(args.target)
    if tgt.kind != "cpu":
        if getattr(args, "calibrate", False):
            raise ValueError(f"--calibrate measures a cpu profile; target {tgt.name!r} is {tgt.kind}")
        return args.target
    tgt, note = resolve_cpu_profile(args.target, threads=None, calibrate=getattr(args, "calibrate", False),
                                    log=lambda m: print(m, file=sys.stderr))
    if note:
        print(note, file=sys.stderr if note.startswith("WARNING") else sys.stdout)
    return tgt


def compile_command(args) -> int:
    """The body of `nmsparse compile`: compile, write the directory, print a summary. Returns 0."""
    measure = {"auto": None, "yes": True, "no": False}[args.measure]
    compiled, paths = compile_to_dir(args.model, _target_for(args), args.out, input_shape=args.input_shape,
                                     prune=args.prune, array=args.array, allow_dense=args.allow_dense,
                                     on_incompatible=args.on_incompatible, charts=not args.no_charts,
                                     measure=measure, backend=args.backend, seed=args.seed)
    t = compiled.totals()
    print(f"{compiled.source} on {compiled.target.label}: {t['sparse_layers']} of {t['layers']} layers sparse")
    print(f"  estimated time {fmt_s(t['dense_time_s'])} dense -> {fmt_s(t['time_s'])} compiled "
          f"({t['speedup']:.2f}x); bytes moved {fmt_bytes(t['dense_bytes_moved'])} -> {fmt_bytes(t['bytes_moved'])}")
    print(f"  model file {fmt_bytes(t['file_bytes'])} ({t['file_ratio']:.2f} of dense {fmt_bytes(t['dense_file_bytes'])})")
    stored = [p for p in compiled.layers if p.format.sparse]
    dense_run = [p for p in stored if p.decision != "sparse"]
    if dense_run:  # stored compactly but estimated (or measured) faster dense on this target: say why
        from collections import Counter

        why = Counter(n for p in dense_run for n in p.notes).most_common(1)
        print(f"  {len(dense_run)} of the {len(stored)} sparse layers run dense on {compiled.target.label}"
              + (f", e.g. {why[0][0]!r} ({why[0][1]} layers)" if why else "") + "; per layer: report.md")
    timed = [p for p in compiled.layers if p.measured]
    if timed:  # the cpu target times its sparse layers: show measurement beside estimate
        md = sum(p.measured["dense_s"] for p in timed)
        ms = sum(min(p.measured["dense_s"], p.measured["sparse_s"]) for p in timed)
        ed, es = sum(p.estimate.dense_time_s for p in timed), sum(p.estimate.time_s for p in timed)
        print(f"  measured on this CPU, the {len(timed)} sparse layers: {fmt_s(md)} dense -> {fmt_s(ms)} compiled "
              f"({md / ms:.2f}x); estimated for them {fmt_s(ed)} -> {fmt_s(es)}")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    if not args.no_charts and not any(key.startswith("chart") for key in paths):
        print(f"  {CHARTS_SKIPPED}")
    if compiled.arch and compiled.arch.get("kind") == "checkpoint":
        print(f"  run it: nmsparse eval {args.out}   (test accuracy of the compact model, block-sparse on the CPU)")
    return 0
