"""`nmsparse bench gpu`, one transformer MLP block (ViT-B widths; ViT-L too unless quick), forward + backward.

The sparse variants are built by ``nmsparse.sparsify`` exactly as training builds them
(``Variant.config``): SDGP 2:4 on the input gradient (GradSparsity, layers="conv+linear"),
transposable 2:4 weights with ``WeightNM(kernel="auto")`` (SparseCoreLinear: forward and
backward-data on 2:4 sparse tensor cores where the Dispatcher measured them faster), or both.
Each variant with weights is first checked against its kernel="dense" twin (the same masks and
math with dense products).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..models import MLPBlock
from ..nn.config import GradSparsity, SparsityConfig, WeightNM
from ..nn.sparse_cores import SparseCoreLinear
from ..nn.sparsify import sparse_layers, sparsify
from .gpu_env import Timer, err_text, fmt_ms, fmt_x, rel_err
from ..common.text import markdown_table

__all__ = ["Variant", "BLOCK_VARIANTS", "sparsify_variant", "layer_counts", "bench_block", "block_table"]


@dataclass(frozen=True)
class Variant:
    """A benchmarked configuration: weight: transposable 2:4 weights (SR-STE, WeightNM with
    kernel="auto"); sdgp: None or the SDGP 2:4 method for the input gradient of convs and Linears."""

    weight: bool = False
    sdgp: str | None = None

    @property
    def name(self) -> str:
        parts = (["2:4-T weights"] if self.weight else []) + ([f"SDGP 2:4 {self.sdgp}"] if self.sdgp else [])
        return " + ".join(parts) or "dense"

    @property
    def dense(self) -> bool:
        return not (self.weight or self.sdgp)

    def config(self, kernel: str = "auto") -> SparsityConfig | None:
        """The SparsityConfig that `sparsify` gets (None for the dense variant); layers whose
        channels do not divide 4 stay dense."""
        if self.dense:
            return None
        return SparsityConfig(weight=WeightNM(2, 4, transposable=True, kernel=kernel) if self.weight else None,
                              grad=GradSparsity(2, 4, method=self.sdgp, layers="conv+linear") if self.sdgp else None,
                              on_incompatible="skip")


BLOCK_VARIANTS = [Variant(), Variant(sdgp="rescale"), Variant(sdgp="magnitude"), Variant(sdgp="tile24"),
                  Variant(weight=True), Variant(weight=True, sdgp="rescale")]


def sparsify_variant(model: nn.Module, variant: Variant, kernel: str = "auto", filter_fn=None) -> nn.Module:
    """`model` sparsified in place for `variant` (default filter unless filter_fn); returns it."""
    config = variant.config(kernel)
    if config is None:
        return model
    with warnings.catch_warnings():  # the skipped layers (channels not divisible by 4) stay dense
        warnings.simplefilter("ignore")
        return sparsify(model, config, filter_fn)


def layer_counts(model: nn.Module) -> tuple[int, int]:
    """(layers sparsify converted, of which Linears on the sparse-core path)."""
    return (sum(1 for _ in sparse_layers(model)),
            sum(isinstance(m, SparseCoreLinear) for m in model.modules()))


def _linears(name: str, mod: nn.Module) -> bool:  # both of the block's Linears (no classifier here)
    return isinstance(mod, nn.Linear)


def _twin_check(make, variant: Variant, x: torch.Tensor, gout: torch.Tensor) -> str:
    """Output and input gradient of the kernel="auto" block vs its kernel="dense" twin."""
    outs = []
    for kernel in ("auto", "dense"):
        block = sparsify_variant(make(), variant, kernel, _linears)
        xi = x.detach().clone().requires_grad_()
        y = block(xi)
        y.backward(gout)
        outs.append((y.detach(), xi.grad))
        del block
    err = max(rel_err(outs[0][0], outs[1][0]), rel_err(outs[0][1], outs[1][1]))
    return "ok" if err < 2e-2 else f"MISMATCH vs kernel='dense': rel err {err:.2g}"


def bench_block(device, timer: Timer, quick: bool, log) -> list[dict]:
    widths = [(768, 3072)] if quick else [(768, 3072), (1024, 4096)]  # ViT-B, ViT-L
    tokens, seq = (8192 if quick else 16384), 256
    if device.type != "cuda":
        widths, tokens, seq = [(64, 256)], 128, 32
    rows = []
    for dim, hidden in widths:
        rows += _bench_width(device, timer, dim, hidden, tokens, seq)
    return rows


def _bench_width(device, timer: Timer, dim: int, hidden: int, tokens: int, seq: int) -> list[dict]:
    dtype = torch.bfloat16
    rows, base = [], None
    xs = [torch.randn(tokens // seq, seq, dim, device=device, dtype=dtype) for _ in range(2)]
    gout = torch.randn_like(xs[0])

    def make():
        torch.manual_seed(0)
        return MLPBlock(dim, hidden).to(device, dtype)

    for variant in BLOCK_VARIANTS:
        row = {"block": f"MLP {dim}-{hidden}-{dim}", "tokens": tokens, "variant": variant.name}
        try:
            row["check"] = _twin_check(make, variant, xs[0], gout) if variant.weight else "ok"
            block = sparsify_variant(make(), variant, "auto", _linears)
            row["sparse_layers"], row["core_layers"] = layer_counts(block)

            def step(i, block=block):
                x = xs[i % 2].detach().requires_grad_()
                block(x).backward(gout)

            step(0)
            t = timer(step)
            row["s"] = t
            if base is None and variant.dense:
                base = t
            row["speedup"] = base / t if base else None
            del block
        except Exception as e:
            row["check"] = err_text(e)
        rows.append(row)
    return rows


def block_table(rows) -> str:
    return markdown_table(
        ["block", "tokens", "variant", "sparse layers", "2:4-core Linears", "check", "fwd+bwd ms", "vs dense"],
        [[r["block"], r["tokens"], r["variant"], r.get("sparse_layers", "-"), r.get("core_layers", "-"),
          r.get("check", "-"), fmt_ms(r.get("s")), fmt_x(r.get("speedup"))] for r in rows])
