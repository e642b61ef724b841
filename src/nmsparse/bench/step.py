"""`nmsparse bench step`: what sparsity costs per training step, against dense timed in the same run.

Models (random weights and inputs): a ResNet-18 with the CIFAR stem (3x32x32 images, batch 32, 10
classes) and the GPT of ``nmsparse.models`` (4 layers, 256 wide, 4 heads, block 64, batch 12,
vocabulary 65). Each method is a ``SparsityConfig`` applied by ``nmsparse.sparsify`` with the default
filter to a copy of the same dense model (``METHODS``). The step is README's loop, ``_train_step``:
forward, cross-entropy, backward, AdamW step (``optimizer``: the fused AdamW that ``nmsparse train`` uses, or
torch's default one, whose CPU sqrt slows on a frozen mask's zero state), on the model or on ``torch.compile(model)``.

* Timing: after ``warmup`` steps each (compilation happens there), the timed steps run in rounds:
  every method (dense too) takes ``block`` steps per round, in a fresh seeded random order each round.
  Per method the median, mean (amortised over whole recompute periods) and worst step time. The
  median ratio to dense is paired: per round, the method's block median over dense's block median of
  the same round, then the median over the rounds, with its 95% interval (``timing.median_ci``; a
  run decides a target only if the interval lies on one side of it: "decided"). The host slows this
  VM for seconds at a time: then an outlier round, where a ratio of whole-run medians moves (identical
  dense ResNet-18 copies: up to 1.12 apart that way, 1.01 paired, shuffled; docs/benchmarks.md). The
  mean ratio is mean over dense's mean, unpaired (an amortised cost needs every step). By default
  ``2 * recompute_every`` timed steps (at least 20): two recomputations of the periodic methods' masks.
  Sparse models are attached to their optimizer (masks move per optimizer step). Subnormal floats are
  flushed to zero (``flush_denormal``), as ``nmsparse train`` runs.
* Recompiles (``--compile``): Dynamo's frame compilations (``counters["frames"]["total"]``, one per
  cache miss) in the timed steps, i.e. after warm-up (graph breaks: in warm-up). The methods' models
  share code objects, whose caches together would pass Dynamo's recompile limit that one model alone
  stays under (and fall back to eager): the limit is raised for the run.
* Where the time goes: ``torch.profiler`` over a window of steps (``profile_steps``, or one whole
  recompute period for the periodic methods), eager only (Dynamo drops ``record_function``): the
  CPU time inside the library's scopes (``nn.profiling``: mask computation, masking, SDGP gradient
  pruning) as a share of the window's steps; the rest is everything else.
* Memory (eager and compiled): peak tensor bytes of a step in the same window: the tensors alive at
  its start (parameters, gradients, buffers such as masks, optimizer state; each storage once) plus
  the peak of the running sum of the profiler's allocation events (``profile_memory``: the CPU
  allocator's allocations and frees, compiled code's included; not tracemalloc, blind to tensors). Peak RSS
  too (``rss_steps``): each method in its own process, eager (``step_rss``), and its difference to dense's.
* ``sparsify`` itself: its wall time per method (median over the builds), target < 0.5 s on ResNet-18.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..common.system import flush_denormal, machine_info
from ..common.text import did_you_mean
from ..models import GPT, resnet18
from ..nn import profiling
from ..nn.config import GradSparsity, SparsityConfig, WeightBlock, WeightNM
from ..nn.mask_step import attach
from ..nn.sparsify import sparsify
from .step_profile import profile_window
from .step_rss import measure_rss
from .timing import median_ci, paired_ratios

__all__ = ["METHODS", "MODELS", "OPTIMIZERS", "StepOptions", "make_optimizer", "select_methods", "run_step_bench"]

MODELS = ("resnet18", "gpt")
OPTIMIZERS = ("adamw", "adamw-fused")
MIN_STEPS = 20


@dataclass(frozen=True)
class Method:
    """A benchmarked method: its config for a model kind and recompute interval, and the issue's target ratio."""

    make: object  # (model kind, recompute_every) -> SparsityConfig | None (dense)
    target: float | None = None
    periodic: bool = False  # recomputes its mask every recompute_every steps
    amortised: bool = False  # the target is on the mean step (recomputations included), not the median


def _nm(method: str) -> Method:
    return Method(lambda kind, r: SparsityConfig(weight=WeightNM(n=2, m=4, method=method)), 1.10)


def _transposable(mask_method: str) -> Method:
    return Method(lambda kind, r: SparsityConfig(weight=WeightNM(n=4, m=8, transposable=True, mask_method=mask_method,
                                                                 recompute_every=r)), 1.15, True, True)


def _block(gradual: bool) -> Method:
    def make(kind, r):
        # gradual: blocks zeroed every recompute_every steps from step 0, on a schedule longer than any run
        sched = {"schedule": "gradual", "start_step": 0, "end_step": 1000 * r, "every": r} if gradual else {}
        return SparsityConfig(weight=WeightBlock(block=(8, 8), sparsity=0.5, **sched))

    return Method(make, 1.10, gradual, gradual)


def _sdgp(method: str) -> Method:
    return Method(lambda kind, r: SparsityConfig(grad=GradSparsity(n=2, m=4, method=method, layers=(
        "conv" if kind == "resnet18" else "conv+linear"))), 1.15)


METHODS: dict[str, Method] = {
    "dense": Method(lambda kind, r: None),
    "srste-2:4": _nm("srste"),
    "ste-2:4": _nm("ste"),
    "fixed-2:4": _nm("fixed"),
    "transposable-4:8-exact": _transposable("exact"),
    "transposable-4:8-greedy": _transposable("greedy"),
    "block-8x8-oneshot": _block(False),
    "block-8x8-gradual": _block(True),
    "sdgp-magnitude-2:4": _sdgp("magnitude"),
    "sdgp-rescale-2:4": _sdgp("rescale"),
    "sdgp-random-2:4": _sdgp("random"),
    "sdgp-random-unbiased-2:4": _sdgp("random-unbiased"),
    "sdgp-mvue-2:4": _sdgp("mvue"),
}


def select_methods(names=None) -> list[str]:
    """Method names in table order for names or fnmatch patterns (None: all); dense is always first.

    ValueError naming an unknown name (with the closest one) before any work."""
    if not names:
        return list(METHODS)
    chosen = {"dense"}
    for name in names:
        hits = [m for m in METHODS if fnmatch.fnmatchcase(m, name)]
        if not hits:
            raise ValueError(f"unknown method {name!r}{did_you_mean(name, METHODS) or '.'} Choose from "
                             f"{', '.join(METHODS)} (or a pattern such as 'sdgp-*')")
        chosen.update(hits)
    return [m for m in METHODS if m in chosen]


@dataclass
class StepOptions:
    """Everything `nmsparse bench step` takes (the command's options, same names)."""

    models: tuple = MODELS
    methods: list | None = None  # names or patterns (select_methods); None: all
    compile: str = "both"  # "off" (eager) | "on" (torch.compile) | "both"
    compile_backend: str = "inductor"
    optimizer: str = "adamw-fused"  # torch.optim.AdamW(fused=True), as nmsparse train; "adamw": torch's default
    steps: int | None = None  # timed steps per method; None: 2 * recompute_every (at least MIN_STEPS)
    warmup: int = 3
    block: int = 1  # steps per method per round (rounds in a fresh random order)
    threads: int = 1
    flush_denormal: bool = True  # subnormal floats read and written as 0 on the CPU, as nmsparse train runs
    recompute_every: int = 40
    profile_steps: int = 5  # profiled steps of the per-step methods (0: no profile, no shares, no memory)
    sparsify_repeats: int = 3
    rss_steps: int = 3  # eager steps of each method's own process for its peak RSS (0: no RSS)
    resnet_width: int = 64
    resnet_batch: int = 32
    image_size: int = 32
    gpt_layers: int = 4
    gpt_width: int = 256
    gpt_heads: int = 4
    gpt_block: int = 64
    gpt_batch: int = 12
    gpt_vocab: int = 65
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.compile not in ("off", "on", "both"):
            raise ValueError(f"compile must be 'off', 'on' or 'both', got {self.compile!r}")
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"unknown model {m!r}{did_you_mean(m, MODELS)}; choose from {', '.join(MODELS)}")
        for key in ("warmup", "profile_steps", "rss_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("block", "threads", "recompute_every", "sparsify_repeats", "resnet_width", "resnet_batch",
                    "image_size", "gpt_layers", "gpt_width", "gpt_heads", "gpt_block", "gpt_batch", "gpt_vocab"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.methods = select_methods(self.methods)


def _build(kind: str, o: StepOptions):
    if kind == "resnet18":
        return resnet18(num_classes=10, width=o.resnet_width, stem="cifar")
    return GPT(vocab_size=o.gpt_vocab, block_size=o.gpt_block, n_layer=o.gpt_layers, n_head=o.gpt_heads,
               n_embd=o.gpt_width)


def _batch(kind: str, o: StepOptions, g: torch.Generator):
    if kind == "resnet18":
        return (torch.randn(o.resnet_batch, 3, o.image_size, o.image_size, generator=g),
                torch.randint(0, 10, (o.resnet_batch,), generator=g))
    shape = (o.gpt_batch, o.gpt_block)
    return torch.randint(0, o.gpt_vocab, shape, generator=g), torch.randint(0, o.gpt_vocab, shape, generator=g)


def _describe(kind: str, o: StepOptions, params: int) -> str:
    if kind == "resnet18":
        return (f"resnet18: ResNet-18, CIFAR stem, width {o.resnet_width}, input {o.resnet_batch}x3x{o.image_size}x"
                f"{o.image_size}, 10 classes, {params / 1e6:.2f}M parameters")
    return (f"gpt: GPT, {o.gpt_layers} layers, {o.gpt_width} wide, {o.gpt_heads} heads, batch {o.gpt_batch}x"
            f"{o.gpt_block} tokens, vocabulary {o.gpt_vocab}, {params / 1e6:.2f}M parameters")


def make_optimizer(model, o: StepOptions) -> torch.optim.Optimizer:
    """AdamW at lr 1e-4; fused=True for "adamw-fused" (torch's default for "adamw": one op per tensor on the CPU)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if o.optimizer == "adamw-fused" else None)


def _train_step(model, opt, x, y):
    """One training step as README's loop writes it: forward, cross-entropy, backward, optimizer step.

    The only place the bench trains: where the library moves work (e.g. the mask update to an
    optimizer-step hook), this is what changes."""
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    loss.backward()
    opt.step()
    return loss


@dataclass
class _Runner:
    name: str
    method: Method
    model: torch.nn.Module
    fn: object  # the model, or torch.compile(model)
    opt: torch.optim.Optimizer
    times: list = field(default_factory=list)
    compiles: int = 0  # Dynamo frame compilations in warm-up
    graph_breaks: int = 0
    recompiles: int = 0  # ... and in the timed steps
    profile: dict | None = None


def _dynamo_counts() -> tuple[int, int]:
    """(frame compilations, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], sum(counters["graph_break"].values())


def _runners(kind, base, methods, mode, o: StepOptions, sparsify_s: dict) -> list[_Runner]:
    out = []
    for name in methods:
        method = METHODS[name]
        model = copy.deepcopy(base)
        cfg = method.make(kind, o.recompute_every)
        if cfg is not None:
            repeats = o.sparsify_repeats if not sparsify_s[name] else 1
            for i in range(repeats):
                target = model if i == 0 else copy.deepcopy(base)
                t0 = time.perf_counter()
                sparsify(target, cfg)
                sparsify_s[name].append(time.perf_counter() - t0)
        opt = make_optimizer(model, o)
        if cfg is not None:
            attach(model, opt)
        fn = torch.compile(model, backend=o.compile_backend) if mode == "compile" else model
        out.append(_Runner(name, method, model, fn, opt))
    return out


def _run_mode(kind, base, x, y, mode, steps, o: StepOptions, sparsify_s, log, methods) -> list[_Runner]:
    compiled, ctx = mode == "compile", contextlib.nullcontext()
    if compiled:
        from torch import _dynamo  # here, not at import: seconds at every CLI start

        _dynamo.reset()  # compile from scratch
        n = len(methods)
        ctx = _dynamo.config.patch(recompile_limit=8 * n, accumulated_recompile_limit=256 * n)
    runners = _runners(kind, base, methods, mode, o, sparsify_s)
    counts = _dynamo_counts if compiled else (lambda: (0, 0))
    with ctx:
        for r in runners:
            c0, g0 = counts()
            t0 = time.perf_counter()
            for _ in range(o.warmup):
                _train_step(r.fn, r.opt, x, y)
            c1, g1 = counts()
            r.compiles, r.graph_breaks = c1 - c0, g1 - g0
            log(f"  {kind} {mode} {r.name}: warm-up {time.perf_counter() - t0:.1f} s"
                + (f", {r.compiles} compilations, {r.graph_breaks} graph breaks" if compiled else ""))
        order, rng = list(runners), random.Random(o.seed)
        for start in range(0, steps, o.block):
            rng.shuffle(order)  # no method always runs right after another
            for r in order:
                c0, _ = counts()
                for _ in range(min(o.block, steps - start)):
                    t0 = time.perf_counter()
                    _train_step(r.fn, r.opt, x, y)
                    r.times.append(time.perf_counter() - t0)
                r.recompiles += counts()[0] - c0
        if o.profile_steps:
            for r in runners:
                period = o.recompute_every if r.method.periodic else None
                r.profile = profile_window(lambda r=r: _train_step(r.fn, r.opt, x, y), r.model, r.opt,
                                           period or o.profile_steps, period, o.warmup + steps, not compiled)
    return runners


def _rows(kind, mode, runners, sparsify_s, block) -> list[dict]:
    """One row per runner, its ratios to the dense runner (the first: timed in the same rounds as the rest)."""
    dense = runners[0]
    assert dense.name == "dense"
    d_mean = statistics.fmean(dense.times)
    d_peak = dense.profile["peak_bytes"] if dense.profile else None
    rows = []
    for r in runners:
        med, mean = statistics.median(r.times), statistics.fmean(r.times)
        ratios = paired_ratios(r.times, dense.times, block)
        lo, hi = median_ci(ratios)
        row = {"model": kind, "mode": mode, "method": r.name, "steps": len(r.times), "median_ms": med * 1e3,
               "mean_ms": mean * 1e3, "worst_ms": max(r.times) * 1e3,
               "ratio_median": statistics.median(ratios), "ratio_lo": lo, "ratio_hi": hi, "decided": None,
               "ratio_mean": mean / d_mean, "target": r.method.target, "target_on": None, "meets": None,
               "compiles_warmup": r.compiles if mode == "compile" else None,
               "graph_breaks": r.graph_breaks if mode == "compile" else None,
               "recompiles": r.recompiles if mode == "compile" else None,
               "peak_mb": None, "peak_vs_dense": None, "profiled_steps": None,
               "rss_mb": None, "rss_vs_dense_mb": None,  # eager rows, from run_step_bench's own processes
               "sparsify_s": statistics.median(sparsify_s[r.name]) if sparsify_s[r.name] else None,
               "times_ms": [t * 1e3 for t in r.times]}  # every timed step, in order: step_times.csv
        if r.method.target is not None:
            row["target_on"] = "mean" if r.method.amortised else "median"
            row["meets"] = row[f"ratio_{row['target_on']}"] <= r.method.target
            if row["target_on"] == "median":  # the run decides only if the interval lies on one side of the target
                row["decided"] = not lo <= r.method.target <= hi
        for s in profiling.SCOPES + ("rest",):
            row[f"share_{s.rsplit('.', 1)[-1]}"] = None
        if r.profile:
            row["peak_mb"] = r.profile["peak_bytes"] / 2**20
            row["peak_vs_dense"] = r.profile["peak_bytes"] / d_peak
            row["profiled_steps"] = r.profile["profiled_steps"]
            for s, v in (r.profile["shares"] or {}).items():
                row[f"share_{s.rsplit('.', 1)[-1]}"] = v
        rows.append(row)
    return rows


def run_step_bench(options: StepOptions | None = None, log=print) -> dict:
    """Run the suite; returns {"header": lines, "rows": one dict per model x mode x method, "models": lines}."""
    o = options or StepOptions()
    modes = {"off": ["eager"], "on": ["compile"], "both": ["eager", "compile"]}[o.compile]
    periodic = any(METHODS[m].periodic for m in o.methods)
    steps = o.steps or max(MIN_STEPS, 2 * o.recompute_every if periodic else 0)
    old = torch.get_num_threads()
    torch.set_num_threads(o.threads)
    load0, t_start = os.getloadavg(), time.perf_counter()
    machine = machine_info()
    rows, models = [], []
    try:
        with flush_denormal(o.flush_denormal):  # threads started inside inherit it
            for kind in o.models:
                torch.manual_seed(o.seed)
                base = _build(kind, o).train()
                models.append(_describe(kind, o, sum(p.numel() for p in base.parameters())))
                x, y = _batch(kind, o, torch.Generator().manual_seed(o.seed))
                sparsify_s = {m: [] for m in o.methods}
                for mode in modes:
                    log(f"{kind} {mode}: {len(o.methods)} methods, {o.warmup} warm-up + {steps} timed steps each")
                    runners = _run_mode(kind, base, x, y, mode, steps, o, sparsify_s, log, o.methods)
                    rows += _rows(kind, mode, runners, sparsify_s, o.block)
                    del runners
                if o.rss_steps and "eager" in modes:
                    rss = measure_rss(kind, o.methods, o, o.rss_steps, log)
                    for r in rows:
                        if r["model"] == kind and r["mode"] == "eager":
                            r["rss_mb"] = rss[r["method"]]["peak_mb"]
                            r["rss_vs_dense_mb"] = r["rss_mb"] - rss["dense"]["peak_mb"]
    finally:
        torch.set_num_threads(old)
    load1 = os.getloadavg()
    header = [
        f"machine: {machine}",
        f"load average (1/5/15 min): {' '.join(f'{v:.2f}' for v in load0)} at start, "
        f"{' '.join(f'{v:.2f}' for v in load1)} at end; {time.perf_counter() - t_start:.0f} s in all",
        f"{o.warmup} warm-up + {steps} timed steps per method in rounds of {o.block} step(s) each, a random order "
        f"per round; x dense (median): the median over rounds of the ratio to dense's steps of the same round; "
        f"{'AdamW (fused)' if o.optimizer == 'adamw-fused' else 'AdamW'}; "
        f"mask recompute every {o.recompute_every} steps (transposable, gradual block); subnormal floats "
        f"{'flushed to zero' if o.flush_denormal else 'kept (--flush-denormal off)'}"
        + (f"; torch.compile backend {o.compile_backend}" if "compile" in modes else ""),
    ]
    rounds = -(-steps // o.block)
    if rounds < 6:
        header.append(f"NOTE {rounds} rounds: too few for a 95% interval of the median; the brackets give the "
                      f"whole range of the rounds' ratios, which holds it with probability {1 - 2 ** (1 - rounds):.0%}")
    if periodic and (steps < 2 * o.recompute_every or steps % o.recompute_every):
        header.append(f"NOTE {steps} timed steps are not two or more whole recompute periods: the amortised (mean) "
                      f"ratios of the transposable and gradual-block methods are not representative")
    return {"header": header, "models": models, "rows": rows, "steps": steps}
