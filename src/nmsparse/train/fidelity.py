"""Gradient fidelity: how far each SDGP gradient-pruning method moves a model's gradients from dense backprop.

For one batch and each method, the model's SDGP-capable layers (the same choice as ``sparsify``)
prune their output gradient with that method; K backward passes ("draws": each layer's generator
advances one step per pass, so the random methods draw anew) are compared with one dense backward.
For every Conv2d/Linear layer, in model order, on its input gradient dX and its weight gradient
dW (a layer's dW changes when a layer above it prunes):

- ``cos``: cosine similarity with the dense gradient, averaged over the draws;
- ``norm``: ||g|| / ||dense||, averaged over the draws;
- ``bias``: ||mean over the K draws - dense|| / ||dense||;
- ``relvar``: mean over the draws of ||g - mean||^2 / ||dense||^2 (0 for K = 1);
- ``bias_floor``: sqrt(relvar / (K - 1)), what ``bias`` shows for an unbiased method from the
  draws' noise alone (a method is biased where ``bias`` is well above it);
- ``bias_excess``: sqrt(max(0, bias^2 - bias_floor^2)), the bias with the draws' noise removed
  (bias^2 - floor^2 estimates ||E[g] - dense||^2 / ||dense||^2 without bias);
- ``cos_mean``: cosine of the mean over the K draws with the dense gradient: the direction of
  the expected gradient ("random", whose expectation is n/m times dense, is biased in scale only:
  its cos_mean tends to 1 as K grows; magnitude's stays where it is).

``gradient_fidelity`` returns one row per (method, layer); ``fidelity_command`` is
``nmsparse fidelity`` (a table, CSV and PNG).
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..common.text import did_you_mean, markdown_table
from ..nn import GradSparsity, SparsityConfig, sparsify
from ..nn.sdgp import SDGP_METHODS
from ..nn.sdgp_conv1d import SDGP_LAYERS
from ..nn.sparsify import squash

__all__ = ["gradient_fidelity", "parse_method", "format_fidelity", "write_fidelity", "plot_fidelity",
           "add_fidelity_arguments", "fidelity_command", "FIELDS", "STATS"]

STATS = ("cos", "norm", "bias", "relvar", "bias_floor", "bias_excess", "cos_mean")
FIELDS = ("method", "layer", "kind") + tuple(f"{s}_{k}" for k in ("dx", "dw") for s in STATS)
DEFAULT_METHODS = ("dense", "magnitude", "rescale", "random", "random-unbiased", "mvue")


def parse_method(spec: str, n: int, m: int) -> tuple[str, int, int]:
    """'mvue' -> ('mvue', n, m); 'mvue:1:8' -> ('mvue', 1, 8); 'dense' is dense backprop itself."""
    name, _, nm = str(spec).partition(":")
    choices = ("dense",) + SDGP_METHODS
    if name not in choices:
        raise ValueError(f"methods: unknown method {name!r}{did_you_mean(name, choices)} "
                         f"(choose from {', '.join(choices)}, optionally as method:n:m)")
    if nm:
        a, _, b = nm.partition(":")
        try:
            n, m = int(a), int(b)
        except ValueError:
            raise ValueError(f"methods: {spec!r} should read method:n:m, e.g. mvue:1:8") from None
    return name, n, m


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, seed: int) -> dict:
    """{layer: (dX or None, dW)} of one forward/backward (the forward's randomness fixed by `seed`)."""
    layers = _weight_layers(model)
    inputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                args[0].retain_grad()
                inputs[name] = args[0]
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in layers]
    try:
        model.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loss_fn(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, mod in layers:
        dx = inputs[name].grad if name in inputs else None
        out[name] = (None if dx is None else dx.detach().double().flatten(),
                     None if mod.weight.grad is None else mod.weight.grad.detach().double().flatten())
    return out


def _stats(draws: list[torch.Tensor], dense: torch.Tensor) -> dict:
    nd = float(dense.norm())
    if nd == 0 or not math.isfinite(nd):
        return dict.fromkeys(STATS, math.nan)
    stack = torch.stack(draws)
    norms = stack.norm(dim=1)
    cos = (stack @ dense) / (norms.clamp(min=1e-300) * nd)
    mean = stack.mean(0)
    k = len(draws)
    relvar = float(((stack - mean) ** 2).sum(1).mean()) / nd**2
    bias = float((mean - dense).norm()) / nd
    floor = math.sqrt(relvar / (k - 1)) if k > 1 else 0.0
    return dict(cos=float(cos.mean()), norm=float(norms.mean()) / nd, bias=bias, relvar=relvar, bias_floor=floor,
                bias_excess=math.sqrt(max(0.0, bias * bias - floor * floor)),
                cos_mean=float(mean @ dense) / max(float(mean.norm()) * nd, 1e-300))


def gradient_fidelity(model: nn.Module, batch, methods=DEFAULT_METHODS, draws: int = 8, *, n: int = 2, m: int = 4,
                      layers: str = "conv", seed: int = 0, loss_fn=None, progress: bool = False) -> list[dict]:
    """Per method and layer, the fidelity of the pruned gradients to dense backprop on `batch` (see the module doc).

    model: a dense model (plain Conv2d/Linear; it is not changed: each method works on a copy, in
    the model's train/eval mode). batch: (x, y). methods: names from SDGP_METHODS, "dense", or
    "name:n:m" for another N:M than n:m. layers: which layers prune ("conv" or "conv+linear", as
    GradSparsity.layers). loss_fn(output, y): cross entropy by default. Returns dicts with FIELDS.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a whole number >= 1, got {draws!r}")
    if any(isinstance(mod, SDGP_LAYERS) for mod in model.modules()):
        model = squash(copy.deepcopy(model))
    x, y = batch
    loss_fn = loss_fn or F.cross_entropy
    specs = [parse_method(s, n, m) for s in (methods if not isinstance(methods, str) else [methods])]
    if not specs:
        raise ValueError("methods: give at least one method")
    built = []
    for name, nn_, mm in specs:  # build every copy first: a bad setting fails before any work
        net = copy.deepcopy(model)
        if name != "dense":
            try:
                sparsify(net, SparsityConfig(grad=GradSparsity(nn_, mm, name, layers=layers, seed=seed)))
            except ValueError as e:
                raise ValueError(f"model: no SDGP-capable layer for method {name} {nn_}:{mm}: {e}") from None
        built.append((name if (nn_, mm) == (n, m) or name == "dense" else f"{name} {nn_}:{mm}", net))
    dense = _grads(model, x, y, loss_fn, seed)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(1 if label == "dense" else draws for label, _ in built), desc="fidelity",
               disable=not progress or None, leave=False)
    rows = []
    for label, net in built:
        k = 1 if label == "dense" else draws
        samples = []
        for _ in range(k):
            samples.append(_grads(net, x, y, loss_fn, seed))
            bar.update(1)
        for layer, (ddx, ddw) in dense.items():
            kind = "Linear" if isinstance(model.get_submodule(layer), nn.Linear) else "Conv2d"
            row = {"method": label, "layer": layer, "kind": kind}
            for key, ref, idx in (("dx", ddx, 0), ("dw", ddw, 1)):
                got = [s[layer][idx] for s in samples]
                st = (_stats(got, ref) if ref is not None and all(g is not None for g in got)
                      else dict.fromkeys(STATS, math.nan))
                row.update({f"{stat}_{key}": v for stat, v in st.items()})
            rows.append(row)
    bar.close()
    return rows


def _fmt(v) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else (f"{v:.4f}" if isinstance(v, float) else str(v))


def format_fidelity(rows: list[dict]) -> str:
    """A Markdown table: one line per (method, layer)."""
    headers = ["method", "layer", "cos dX", "norm dX", "bias dX", "noise floor dX", "bias - noise dX", "relvar dX",
               "cos mean dX", "cos dW", "bias - noise dW", "relvar dW", "cos mean dW"]
    keys = ["method", "layer", "cos_dx", "norm_dx", "bias_dx", "bias_floor_dx", "bias_excess_dx", "relvar_dx",
            "cos_mean_dx", "cos_dw", "bias_excess_dw", "relvar_dw", "cos_mean_dw"]
    return markdown_table(headers, [[_fmt(r[k]) for k in keys] for r in rows])


def write_fidelity(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS))
        w.writeheader()
        w.writerows(rows)
    return path


def plot_fidelity(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """cos(dX), bias(dX), relvar(dX), cos of the mean dX and cos(dW) across layers, one line per method."""
    from .plots import _pyplot

    plt = _pyplot()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for ax, (key, label) in zip(axes, [("cos_dx", "cosine of dX to dense"), ("bias_dx", "bias of dX (relative)"),
                                       ("relvar_dx", "relative variance of dX"),
                                       ("cos_mean_dx", "cosine of mean dX to dense"),
                                       ("cos_dw", "cosine of dW to dense")]):
        for i, meth in enumerate(methods):
            vals = {r["layer"]: r[key] for r in rows if r["method"] == meth}
            ax.plot(range(len(layers)), [vals.get(lay, math.nan) for lay in layers], marker="os^"[i // 10 % 3],
                    linestyle=("-", "--", ":")[i // 10 % 3], label=meth, color=f"C{i % 10}")
        if key == "relvar_dx":
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# nmsparse fidelity

def add_fidelity_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML config: the model, data and (optional) grad N:M and layers")
    p.add_argument("--checkpoint", help="checkpoint.pt of a run of this config (default: the config's initial model)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help="methods to compare ('dense' is the baseline; method:n:m for another N:M, e.g. mvue:1:8)")
    p.add_argument("--draws", type=int, default=8, help="backward passes per method (the random ones draw anew)")
    p.add_argument("--nm", help="N:M for the methods (default: the config's grad N:M, else 2:4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--out", help="directory for fidelity.md/.csv/.png (default runs/fidelity/<config stem>)")


def _model_and_batch(args):
    from ..data import normalize_uint8
    from ..models import build_from_record
    from ..models.checkpoint import load_model
    from .config import load_config
    from .loop import loaders_for, record_for

    cfg = load_config(args.config, args.set)
    torch.manual_seed(cfg.seed)  # the order of train(): the same initial model as the run's
    device = torch.device("cpu")
    train_loader, _ = loaders_for(cfg, device)
    if hasattr(train_loader, "set_epoch"):
        train_loader.set_epoch(0)
    x, y = next(iter(train_loader))
    if x.dtype == torch.uint8:
        x = normalize_uint8(x, device)
    record = record_for(cfg, tuple(x.shape[1:]))
    if args.checkpoint is None:
        model = build_from_record(record)
        where = f"the initial model of {args.config} (seed {cfg.seed})"
    else:
        model, state = load_model(args.checkpoint)
        saved = state.get("model_record")
        if saved is not None and saved != record:
            raise ValueError(f"--checkpoint {args.checkpoint} holds a model {saved.get('name')} {saved.get('kwargs')} "
                             f"for samples {saved.get('sample_shape')}, but --config {args.config} builds "
                             f"{record.get('name')} {record.get('kwargs')} for {record.get('sample_shape')}: a "
                             "checkpoint from another config")
        squash(model)
        where = f"{args.checkpoint} (epoch {state.get('epoch')})"
    grad = cfg.sparsity.grad if cfg.sparsity is not None else None
    n, m = (grad.n, grad.m) if grad is not None else (2, 4)
    if args.nm:
        a, _, b = args.nm.partition(":")
        try:
            n, m = int(a), int(b)
        except ValueError:
            raise ValueError(f"--nm expects n:m, e.g. 2:4, got {args.nm!r}") from None
    return cfg, model.train(), (x, y), n, m, (grad.layers if grad is not None else "conv"), where


def fidelity_command(args) -> int:
    if args.draws < 1:
        raise ValueError(f"--draws must be >= 1, got {args.draws}")
    for spec in args.methods:  # names first: a typo fails before the data loads
        parse_method(spec, 2, 4)
    cfg, model, batch, n, m, layers, where = _model_and_batch(args)
    try:
        rows = gradient_fidelity(model, batch, args.methods, args.draws, n=n, m=m, layers=layers, seed=cfg.seed,
                                 progress=cfg.progress)
    except ValueError as e:
        raise ValueError(f"--config {args.config}: {e}") from None
    out = Path(args.out or Path("runs") / "fidelity" / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    head = (f"Gradient fidelity of {where}, one batch of {len(batch[0])}, {n}:{m} on the {layers} layers, "
            f"{args.draws} draws per method")
    table = format_fidelity(rows)
    (out / "fidelity.md").write_text(head + "\n\n" + table + "\n")
    write_fidelity(rows, out / "fidelity.csv")
    plot_fidelity(rows, out / "fidelity.png", title=f"{cfg.name}: {n}:{m}, {args.draws} draws")
    print(head + "\n\n" + table + f"\n\nSaved {out}/fidelity.md, fidelity.csv, fidelity.png")
    return 0
