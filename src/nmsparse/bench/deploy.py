"""`nmsparse bench deploy`: block-sparse CPU execution against dense, and the cpu profile's estimates.

For ResNet-50 and VGG-16 (batch 1, 224x224; ``quick``: 112x112) with random weights, every
Conv2d/Linear but the first conv gets 50% and 75% of its 8x8 blocks zeroed (lowest L2 norm, as
``nmsparse compile --prune`` does). Per layer, on an input of the layer's shape, alternating
repeats time (median):

* dense: PyTorch ``F.conv2d`` / ``F.linear`` on the dense-with-zeros weight (what you run today);
* sparse: the block-sparse kernel (``kernels.block_cpu``) on the kept blocks, at each sparsity;
* kernel at 100%: the same kernel with every block kept, which separates the kernel's own speed
  from the gain of skipping blocks;

all in one alternating group per layer, so that load from other processes hits them alike;

then the per-layer fallback keeps the faster of dense and sparse, and the cpu profile estimates the
chosen path: ``profile=``, or the one cached for this CPU model and thread count, or the shipped
``compile/targets/cpu.yaml`` (see ``compile.cpu_profile``: the command calibrates on first use on
another CPU). Totals are sums over
the conv/linear layers; the whole compiled model (fallbacks applied) is also run end to end
against the dense model, outputs compared (float32 reassociation: rtol 1e-4 relative to the
largest output), after a round trip through its compact file (compile, save, load back).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..compile.compiler import compile_model, load_compact_state
from ..compile.cost import cpu_dense_time, cpu_sparse_time
from ..compile.cpu_profile import resolve_cpu_profile
from ..compile.layers import extract_layers
from ..compile.runtime import alternating_timer, build_executable, layer_input, supports_sparse, to_block_sparse
from ..kernels.block_cpu import BlockSparseMatrix, native_error, resolve_backend
from ..models import resnet50, vgg16
from ..prune.magnitude import prune_blocks
from ..common.system import machine_info
from ..common.text import markdown_table
from .timing import fmt_time

__all__ = ["run_deploy_bench", "add_deploy_arguments", "deploy_main", "LARGE_MACS"]

LARGE_MACS = 100e6  # "large layer": at least 100 M multiply-accumulates at 224x224
NETWORKS = {"resnet50": lambda size: resnet50(), "vgg16": lambda size: vgg16(image_size=size)}


def _end_to_end(dense_model, exe, x, repeats) -> dict:
    with torch.no_grad():
        ref = dense_model(x)
        out = exe(x)
        err = float((out - ref).abs().max())
        scale = float(ref.abs().max())
        td, ts = alternating_timer([lambda: dense_model(x), lambda: exe(x)], repeats=repeats, budget_s=20.0)
    return {"dense_s": td, "compiled_s": ts, "speedup": td / ts, "max_abs_err": err, "max_abs_out": scale,
            "close": err <= 1e-4 * max(scale, 1.0)}


@torch.no_grad()
def run_deploy_bench(quick: bool = False, *, networks=("resnet50", "vgg16"), sparsities=(0.5, 0.75),
                     image_size: int | None = None, threads: int = 1, profile="cpu", repeats: int | None = None,
                     backend: str = "auto", seed: int = 0, end_to_end: bool = True, calibrate: bool = False,
                     auto_calibrate: bool = False, log=print) -> dict:
    """Run the benchmark; returns {"machine", "profile", "layers": rows, "totals": rows, "tables": Markdown}.

    The estimates come from ``compile.cpu_profile.resolve_cpu_profile(profile, ...)``: for the shipped name
    "cpu", the profile cached for this CPU model and thread count when there is one. calibrate=True measures
    a fresh one first (``calibrate_cpu``) and caches it; auto_calibrate=True (the command's default) does so
    when the shipped profile was measured on another CPU model or thread count and nothing is cached yet.
    Without either, a profile from another CPU is used with a warning in the header ("machine").
    """
    bad = [s for s in sparsities if not (isinstance(s, (int, float)) and 0 <= s < 1)]
    if bad or not sparsities:
        raise ValueError(f"sparsities must be fractions of 8x8 blocks zeroed, each 0 <= s < 1, got {list(sparsities)}")
    size = image_size or (112 if quick else 224)
    repeats = repeats or (5 if quick else 11)
    use = resolve_backend(backend)
    tgt, note = resolve_cpu_profile(profile, threads=threads, calibrate=calibrate, auto_calibrate=auto_calibrate,
                                    quick=quick, backend=backend, log=log)
    if tgt.kind != "cpu":
        raise ValueError(f"the deploy bench estimates with a cpu profile, got {tgt.name!r} ({tgt.kind})")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t_start = time.perf_counter()
    layer_rows, total_rows, e2e_rows = [], [], []
    # machine_info reports torch's thread count, which is `threads` from here on
    info = (f"machine: {machine_info()}; kernel backend {use}"
            + ("" if use == "native" else f" (native unavailable: {native_error()})")
            + f"; estimates from profile {tgt.source} (measured {tgt.params.get('measured', '?')}); "
              f"input 1x3x{size}x{size}; {'quick' if quick else 'full'} run")
    prof_threads = tgt.params.get("threads")
    if note:
        info += f"; {note}"
        if note.startswith("WARNING"):
            log(note)
    if prof_threads is not None and prof_threads != threads:
        info += (f"; NOTE the profile was measured with {prof_threads} thread(s), this run uses {threads}: its "
                 f"estimates are for {prof_threads} (add --calibrate to measure one for {threads})")
    log(info)

    def timer(fns):
        return alternating_timer(fns, repeats=repeats, budget_s=3.0 if quick else 6.0)

    try:
        for net in networks:
            if net not in NETWORKS:
                raise ValueError(f"unknown network {net!r}; choose from {', '.join(NETWORKS)}")
            base = NETWORKS[net](size).eval()
            shape = (1, 3, size, size)
            models = {}
            for sp in sparsities:
                models[sp] = copy.deepcopy(base)
                prune_blocks(models[sp], sp)
            calls = {sp: extract_layers(m, shape) for sp, m in models.items()}
            rows = {sp: [] for sp in sparsities}
            for i, (spec, _) in enumerate(calls[sparsities[0]]):
                x = layer_input(spec, g)
                mods = [calls[sp][i][1] for sp in sparsities]
                # dense, every sparsity's kernel and the kernel with all blocks kept, timed in one alternating
                # group so that changes of load from other processes hit all of them alike
                fns = [lambda m=mods[0], x=x: m(x)]
                sparse_mods = []
                if supports_sparse(mods[0]) and i > 0:
                    for m in mods:
                        sm = to_block_sparse(m, use)
                        sparse_mods.append(sm)
                        fns.append(lambda s=sm, x=x: s(x))
                    full = copy.copy(sparse_mods[0])
                    full.mat = BlockSparseMatrix.from_weight(torch.where(mods[0].weight == 0, 1e-3, mods[0].weight)
                                                             .detach())
                    fns.append(lambda f=full, x=x: f(x))
                times = timer(fns)
                td = times[0]
                tf = times[-1] if sparse_mods else float("nan")
                est_d = cpu_dense_time(spec, tgt.params)
                for j, sp in enumerate(sparsities):
                    row = {"network": net, "sparsity": sp, "layer": spec.name, "shape": spec.describe(),
                           "macs": spec.macs, "large": spec.macs * (224 / size) ** 2 >= LARGE_MACS}
                    if sparse_mods:
                        sm, ts = sparse_mods[j], times[1 + j]
                        decision = "sparse" if ts < td else "dense"
                        est_s = cpu_sparse_time(spec, sm.mat.nnzb // (spec.kh * spec.kw), tgt.params)
                        density = sm.mat.density
                    else:
                        ts, decision, density, est_s = float("nan"), "dense", 1.0, est_d
                    meas = ts if decision == "sparse" else td
                    est = est_s if decision == "sparse" else est_d
                    row.update(density=density, dense_s=td, sparse_s=ts, full_kernel_s=tf, decision=decision,
                               compiled_s=meas, est_dense_s=est_d, est_sparse_s=est_s, est_s=est,
                               est_err=(est - meas) / meas, speedup=td / meas)
                    rows[sp].append(row)
            for sp in sparsities:
                model, sp_rows = models[sp], rows[sp]
                chosen = [r["layer"] for r in sp_rows if r["decision"] == "sparse"]
                layer_rows += sp_rows
                total = _total(net, sp, sp_rows)
                total_rows.append(total)
                log(f"{net} {sp:.0%}: dense {fmt_time(total['dense_s'])}, compiled {fmt_time(total['compiled_s'])} "
                    f"({total['speedup']:.2f}x), estimate {fmt_time(total['est_s'])} ({total['est_err']:+.1%}); "
                    f"large layers sparse kernel {total['large_min_speedup']:.2f}-{total['large_max_speedup']:.2f}x")
                if end_to_end:
                    x = torch.randn(shape, generator=g)
                    # run the compact model: compile, save, load back, execute (a few seconds even for
                    # VGG-16's 280 MB file at 50%, small next to the timing)
                    compiled = compile_model(model, tgt, shape, measure=False, source=f"{net} {sp:.0%}",
                                             with_subvolumes=False)
                    with tempfile.TemporaryDirectory() as tmp:
                        compiled.save(tmp, charts=False)
                        state, _ = load_compact_state(Path(tmp) / "model.safetensors")
                    del compiled
                    fresh = NETWORKS[net](size).eval()
                    fresh.load_state_dict(state)
                    del state
                    exe = build_executable(fresh, chosen, use)
                    e2e = {"network": net, "sparsity": sp, "weights_from": "compact file",
                           **_end_to_end(model, exe, x, max(3, repeats // 2))}
                    e2e_rows.append(e2e)
                    log(f"  end to end: dense {fmt_time(e2e['dense_s'])}, compiled {fmt_time(e2e['compiled_s'])} "
                        f"({e2e['speedup']:.2f}x), max |diff| {e2e['max_abs_err']:.2e} (outputs up to "
                        f"{e2e['max_abs_out']:.2e}) {'OK' if e2e['close'] else 'MISMATCH'}")
            del models, calls
    finally:
        torch.set_num_threads(old)
    elapsed = time.perf_counter() - t_start
    tables = _tables(layer_rows, total_rows, e2e_rows)
    return {"machine": info, "elapsed_s": elapsed, "profile": tgt.to_dict(), "layers": layer_rows,
            "totals": total_rows, "end_to_end": e2e_rows, "tables": tables}


def _total(net, sp, rows) -> dict:
    tot_d = sum(r["dense_s"] for r in rows)
    tot_c = sum(r["compiled_s"] for r in rows)
    tot_e = sum(r["est_s"] for r in rows)
    tot_ed = sum(r["est_dense_s"] for r in rows)
    large = [r["dense_s"] / r["sparse_s"] for r in rows if r["large"] and r["sparse_s"] == r["sparse_s"]]
    nan = float("nan")
    return {"network": net, "sparsity": sp, "layers": len(rows),
            "sparse_layers": sum(r["decision"] == "sparse" for r in rows),
            "fallbacks": sum(r["decision"] == "dense" and r["sparse_s"] == r["sparse_s"] for r in rows),
            "dense_s": tot_d, "compiled_s": tot_c, "speedup": tot_d / tot_c, "est_s": tot_e,
            "est_err": (tot_e - tot_c) / tot_c, "est_dense_s": tot_ed, "est_dense_err": (tot_ed - tot_d) / tot_d,
            "large_layers": len(large), "large_min_speedup": min(large) if large else nan,
            "large_median_speedup": statistics.median(large) if large else nan,
            "large_max_speedup": max(large) if large else nan}


def _pct(x):
    return "" if x != x else f"{x:+.0%}"


def _ms(x):
    return "" if x != x else f"{x * 1e3:.3f}"


def _tables(layers, totals, e2e) -> dict:
    t = {}
    t["totals"] = markdown_table(
        ["network", "blocks zeroed", "dense ms", "compiled ms", "speed-up", "cpu-profile estimate ms", "estimate error",
         "dense estimate error", "sparse layers / fallbacks", "large layers: sparse kernel speed-up min / median"],
        [[r["network"], f"{r['sparsity']:.0%}", _ms(r["dense_s"]), _ms(r["compiled_s"]), f"{r['speedup']:.2f}x",
          _ms(r["est_s"]), _pct(r["est_err"]), _pct(r["est_dense_err"]), f"{r['sparse_layers']} / {r['fallbacks']}",
          f"{r['large_min_speedup']:.2f}x / {r['large_median_speedup']:.2f}x ({r['large_layers']} layers)"]
         for r in totals])
    if e2e:
        t["end_to_end"] = markdown_table(
            ["network", "blocks zeroed", "weights from", "dense forward ms", "compiled forward ms", "speed-up",
             "max |diff|", "max |output|", "equal (rtol 1e-4)"],
            [[r["network"], f"{r['sparsity']:.0%}", r["weights_from"], _ms(r["dense_s"]), _ms(r["compiled_s"]),
              f"{r['speedup']:.2f}x", f"{r['max_abs_err']:.2e}", f"{r['max_abs_out']:.2e}", "yes" if r["close"] else "NO"]
             for r in e2e])
    for (net, sp) in dict.fromkeys((r["network"], r["sparsity"]) for r in layers):
        rows = [r for r in layers if r["network"] == net and r["sparsity"] == sp]
        t[f"{net} {sp:.0%}"] = markdown_table(
            ["layer", "shape", "blocks kept", "dense ms", "sparse ms", "kernel @100% ms", "runs", "speed-up",
             "estimate ms", "error"],
            [[f"`{r['layer']}`", r["shape"] + (" *" if r["large"] else ""), f"{r['density']:.2f}", _ms(r["dense_s"]),
              _ms(r["sparse_s"]), _ms(r["full_kernel_s"]), r["decision"], f"{r['speedup']:.2f}x", _ms(r["est_s"]),
              _pct(r["est_err"])] for r in rows])
    return t


def _sparsity(text: str) -> float:
    """argparse type of --sparsity: a fraction of blocks zeroed, 0 <= s < 1."""
    try:
        s = float(text)
    except ValueError:
        s = float("nan")
    if not 0 <= s < 1:  # also rejects nan
        # argparse prefixes "argument --sparsity: "
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction of 8x8 blocks zeroed: use 0 <= s < 1 "
                                         f"(e.g. 0.5 zeroes half the blocks)")
    return s


def add_deploy_arguments(p) -> None:
    """Options of `nmsparse bench deploy` on an argparse parser."""
    p.add_argument("--quick", action="store_true", help="112x112 inputs and fewer repeats (about a minute)")
    p.add_argument("--networks", nargs="+", default=["resnet50", "vgg16"], choices=sorted(NETWORKS))
    p.add_argument("--sparsity", type=_sparsity, nargs="+", default=[0.5, 0.75],
                   help="fractions of 8x8 blocks zeroed, each 0 <= s < 1 (default 0.5 0.75)")
    p.add_argument("--image-size", type=int, help="input height and width (default 224, quick 112)")
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1: stable on a shared machine)")
    p.add_argument("--profile", default="cpu",
                   help="cpu profile for the estimates (name or YAML path; default cpu: the one cached for this "
                        "CPU model and thread count, else the shipped one where it was measured on this CPU)")
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--calibrate", action="store_true",
                     help="measure a fresh cpu profile first, cache it for this CPU and estimate with it")
    cal.add_argument("--no-calibrate", action="store_true",
                     help="never measure a profile: when the shipped one is from another CPU, estimate with it "
                          "anyway (the header warns). Default: measure on first use and cache it")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
    p.add_argument("--summary", action="store_true",
                   help="print only the totals and end-to-end tables (default: the per-layer tables too)")
    p.add_argument("--layers", action="store_true",
                   help="accepted for compatibility and ignored: the per-layer tables print by default")
    p.add_argument("--out", help="write all tables (Markdown) here and a JSON copy beside it")


def deploy_main(args) -> int:
    """Run `nmsparse bench deploy` from parsed arguments (see add_deploy_arguments)."""
    import json

    res = run_deploy_bench(quick=args.quick, networks=tuple(args.networks), sparsities=tuple(args.sparsity),
                           image_size=args.image_size, threads=args.threads, profile=args.profile,
                           backend=args.backend, calibrate=args.calibrate,
                           auto_calibrate=not getattr(args, "no_calibrate", False))
    # per layer by default (dense, sparse, estimate, error for each layer); --summary: totals only
    keys = ["totals", "end_to_end"] + ([] if getattr(args, "summary", False) else
                                       [k for k in res["tables"] if k not in ("totals", "end_to_end")])
    text = "\n\n".join([res["machine"]] + [f"## {k}\n\n{res['tables'][k]}" for k in keys if k in res["tables"]])
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        full = "\n\n".join([res["machine"]] + [f"## {k}\n\n{v}" for k, v in res["tables"].items()])
        out.write_text(full + "\n")
        out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    return 0
