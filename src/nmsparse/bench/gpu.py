"""`nmsparse bench gpu`: what the Triton kernels and 2:4 sparse tensor cores buy on this GPU.

``run(out=None, quick=False)`` measures, printing a Markdown table after each part:

1. the machine: GPU, torch, CUDA, cuSPARSELt, triton versions;
2. "roofs": copy bandwidth (the roof for the pruning kernels) and the dense bf16 matmul rate
   (``gpu_env``);
3. "prune": every Triton pruning kernel against the torch implementation (``gpu_prune``);
4. "gemm": dense vs 2:4 GEMMs for ViT-B, ViT-L and GPT-2 XL MLP shapes: 2:4 weights forward,
   transposable 2:4 weights backward-data, SDGP's input gradient by the separate and fused
   routes (``gpu_gemm``);
5. "block": forward + backward of one transformer MLP block (ViT-B widths) (``gpu_block``);
6. "train": whole training steps (bf16 weights, SGD) of vit_tiny, a ViT-B/16 and ResNet-50
   (channels_last): dense vs SDGP 2:4 vs transposable 2:4 weights vs both (``gpu_train``);
7. "dispatch": after 5 and 6, the Dispatcher's decisions: which products of the sparse-core
   layers ran on 2:4 sparse tensor cores, with the measured speed-ups.

The block and training-step variants are built by ``nmsparse.sparsify`` (GradSparsity for SDGP,
WeightNM(2, 4, transposable=True, kernel="auto") for the weights), so the bench measures what
training runs. Times are medians of CUDA-event timings with rotating inputs. Results go to `out`
(a .json path, with a .md beside it, or a directory) with the GPU name and library versions.
Without CUDA, ``run`` exits (SystemExit) with a message saying so.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import torch

from ..kernels.dispatch import default_dispatcher
from .gpu_block import bench_block, block_table
from .gpu_env import Timer, bench_roofs, environment, err_text, fmt_x, roofs_table
from .gpu_gemm import GEMM_SHAPES, bench_gemm, gemm_table
from .gpu_prune import bench_prune, prune_table
from .gpu_train import bench_train, train_table
from ..common.text import markdown_table

__all__ = ["run", "NO_CUDA_MESSAGE", "GEMM_SHAPES", "SECTIONS"]

SECTIONS = ("roofs", "prune", "gemm", "block", "train")

NO_CUDA_MESSAGE = ("nmsparse bench gpu needs a CUDA GPU (2:4 sparse tensor cores: sm80 or newer) and "
                   "found none (torch.cuda.is_available() is False). Run it on a GPU machine, e.g. "
                   "with scripts/gpu_check.sh.")


def dispatch_table(rows: list[dict]) -> str:
    return markdown_table(["op", "shape (rows x k x n)", "dtype", "route", "sparse vs dense", "reason"],
                          [[r["op"], r["shape"], r["dtype"], r["choice"], fmt_x(r.get("speedup")), r["reason"]]
                           for r in rows])


def _paths(out) -> tuple[Path, Path] | None:
    if out is None:
        return None
    out = Path(out)
    if out.suffix == ".json":
        return out, out.with_suffix(".md")
    if out.suffix == ".md":
        return out.with_suffix(".json"), out
    return out / "bench-gpu.json", out / "bench-gpu.md"


def _save(results: dict, out, quick: bool) -> tuple[Path, Path] | None:
    """Write results as JSON and Markdown to `out` (see ``run``); returns the two paths."""
    paths = _paths(out)
    if paths is None:
        return None
    env = results["environment"]
    jpath, mpath = paths
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(results, indent=1, default=str))
    head = [f"# nmsparse bench gpu{' (quick)' if quick else ''}", "",
            f"GPU: {env.get('gpu')} (sm {env.get('capability')}, {env.get('sms')} SMs, "
            f"{env.get('memory_gib')} GiB); torch {env['torch']}, CUDA {env['cuda']}, "
            f"cuSPARSELt {env.get('cusparselt')}, triton {env['triton']}, nmsparse {env.get('nmsparse')}; "
            f"{env['machine']}", ""]
    body = [f"## {k}\n\n{v}\n" for k, v in results["tables"].items()]
    errs = [f"- {e['section']}: {e['error']}" for e in results["errors"]]
    mpath.write_text("\n".join(head + body + (["## errors", ""] + errs if errs else [])) + "\n")
    return paths


def _record_dispatch(results: dict, log=None) -> None:
    """The Dispatcher's decisions so far (the sparse-core layers of the block and train sections)."""
    decisions = default_dispatcher().report()
    if decisions:
        results["dispatch"] = decisions
        results["tables"]["dispatch"] = text = dispatch_table(decisions)
        if log is not None:
            log(f"\n## dispatch (which products the sparse-core layers ran on 2:4 sparse tensor cores)\n{text}")


def run(out=None, quick: bool = False, log=print, sections=None, _allow_cpu: bool = False) -> dict:
    """Run the GPU benchmarks; print each table as it is done; save JSON + Markdown to `out`.

    out: a .json or .md path (the other file is written beside it) or a directory
    (bench-gpu.json, bench-gpu.md in it). quick: smaller shapes and fewer repeats (a few minutes).
    sections: a subset of ("roofs", "prune", "gemm", "block", "train"). Returns the results dict.
    Raises SystemExit with NO_CUDA_MESSAGE when there is no CUDA device (``_allow_cpu`` runs a
    tiny dry run on the CPU instead, for tests: every sparse product then reports its error).
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif _allow_cpu:
        device = torch.device("cpu")
    else:
        raise SystemExit(NO_CUDA_MESSAGE)
    wanted = tuple(sections) if sections else SECTIONS
    timer = Timer(device, warmup=2 if quick else 3, reps=10 if quick else 20)
    if device.type != "cuda":
        timer = Timer(device, warmup=1, reps=2)
    results: dict = {"environment": environment(device), "quick": quick, "errors": [], "tables": {}}
    env = results["environment"]
    log(f"GPU: {env.get('gpu')} (sm {env.get('capability')}), torch {env['torch']}, CUDA {env['cuda']}, "
        f"cuSPARSELt {env.get('cusparselt')}, triton {env['triton']}; 2:4 sparse cores: {env['sparse_cores']}")
    copy_gbs = None
    t0 = time.perf_counter()
    # the dispatch table is printed once, after the last section whose layers go through the Dispatcher
    print_dispatch = next((w for w in reversed(wanted) if w in ("block", "train")), None)

    def section(name, fn, table=None):
        if name not in wanted:
            return None
        log(f"\n## {name}")
        try:
            res = fn()
        except Exception as e:  # keep going: later sections may still work
            results["errors"].append({"section": name, "error": err_text(e),
                                      "traceback": traceback.format_exc()[-3000:]})
            log(f"{name} failed: {err_text(e)}")
            _save(results, out, quick)
            return None
        results[name] = res
        if table is not None:
            text = table(res)
            results["tables"][name] = text
            log(text)
        if name in ("block", "train"):
            _record_dispatch(results, log if name == print_dispatch else None)
        _save(results, out, quick)  # what is done survives a run cut short (a time-boxed lease)
        return res

    roofs = section("roofs", lambda: bench_roofs(device, timer, quick), roofs_table)
    if roofs:
        copy_gbs = roofs["copy_gbs"]
    section("prune", lambda: bench_prune(device, timer, quick, copy_gbs, log), prune_table)
    section("gemm", lambda: bench_gemm(device, timer, quick, log), gemm_table)
    section("block", lambda: bench_block(device, timer, quick, log), block_table)
    section("train", lambda: bench_train(device, timer, quick, log), train_table)
    results["seconds"] = time.perf_counter() - t0
    paths = _save(results, out, quick)
    if paths is not None:
        log(f"\nwrote {paths[0]} and {paths[1]}")
    return results
