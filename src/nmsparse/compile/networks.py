"""Layer shapes of the paper's networks (ResNet-50, Inception-v3, VGG-16) and the AIE2 table.

``network_specs(name)`` gives the Conv2d/Linear calls of one 224x224 (Inception: 299x299) image:
ResNet-50 and VGG-16 from ``nmsparse.models`` traced on the meta device, Inception-v3 from the layer
list in ``inception_v3_specs`` (Szegedy et al. 2016, the torchvision layout without the
auxiliary head; written out by hand, so "Inception-v3-like").

``aie2_table`` reproduces the paper's estimate method: 50% of the 8x8 blocks of every layer but
the first conv zeroed (a random grid per layer with exactly that many zero blocks; the first
conv has 3 input channels and stays dense), each network planned on AIE2 arrays, whole-network
time = sum of the conv/linear layer times, set beside the published whole-network speed-ups.
"""

from __future__ import annotations

import torch

from ..models import resnet50, vgg16
from .cost import estimate_layer
from .layers import LayerFormat, LayerSpec, extract_layers
from .profiles import load_target

__all__ = ["network_specs", "inception_v3_specs", "random_block_grid", "sparse_grids",
           "aie2_table", "format_aie2_table", "PUBLISHED", "NETWORKS"]

NETWORKS = ("resnet50", "inception_v3", "vgg16")

# SPEC section 5: published whole-network speed-ups at 50% 8x8 sparsity on AIE2 arrays 2x2..8x8.
PUBLISHED = {
    "resnet50": {"speedup": (1.27, 1.57), "note": "10.77 -> 7.06 ms on 4x4"},
    "inception_v3": {"speedup": (1.60, 1.76), "note": ""},
    "vgg16": {"speedup": (1.41, 1.72), "note": ""},
}

def _inception_a(p, cin, pool):
    c = LayerSpec.conv
    return [c(f"{p}.b1x1", cin, 64, 1, 35), c(f"{p}.b5x5_1", cin, 48, 1, 35), c(f"{p}.b5x5_2", 48, 64, 5, 35),
            c(f"{p}.b3x3dbl_1", cin, 64, 1, 35), c(f"{p}.b3x3dbl_2", 64, 96, 3, 35),
            c(f"{p}.b3x3dbl_3", 96, 96, 3, 35), c(f"{p}.bpool", cin, pool, 1, 35)]


def _inception_c(p, c7):
    c = LayerSpec.conv
    return [c(f"{p}.b1x1", 768, 192, 1, 17), c(f"{p}.b7x7_1", 768, c7, 1, 17),
            c(f"{p}.b7x7_2", c7, c7, (1, 7), 17), c(f"{p}.b7x7_3", c7, 192, (7, 1), 17),
            c(f"{p}.b7x7dbl_1", 768, c7, 1, 17), c(f"{p}.b7x7dbl_2", c7, c7, (7, 1), 17),
            c(f"{p}.b7x7dbl_3", c7, c7, (1, 7), 17), c(f"{p}.b7x7dbl_4", c7, c7, (7, 1), 17),
            c(f"{p}.b7x7dbl_5", c7, 192, (1, 7), 17), c(f"{p}.bpool", 768, 192, 1, 17)]


def _inception_e(p, cin):
    c = LayerSpec.conv
    return [c(f"{p}.b1x1", cin, 320, 1, 8), c(f"{p}.b3x3_1", cin, 384, 1, 8),
            c(f"{p}.b3x3_2a", 384, 384, (1, 3), 8), c(f"{p}.b3x3_2b", 384, 384, (3, 1), 8),
            c(f"{p}.b3x3dbl_1", cin, 448, 1, 8), c(f"{p}.b3x3dbl_2", 448, 384, 3, 8),
            c(f"{p}.b3x3dbl_3a", 384, 384, (1, 3), 8), c(f"{p}.b3x3dbl_3b", 384, 384, (3, 1), 8),
            c(f"{p}.bpool", cin, 192, 1, 8)]


def inception_v3_specs(batch: int = 1) -> list[LayerSpec]:
    """Conv/Linear calls of Inception-v3 on one 299x299 image (no auxiliary classifier)."""
    c = LayerSpec.conv
    specs = [c("Conv2d_1a_3x3", 3, 32, 3, 299, 2, 0), c("Conv2d_2a_3x3", 32, 32, 3, 149, 1, 0),
             c("Conv2d_2b_3x3", 32, 64, 3, 147, 1, 1), c("Conv2d_3b_1x1", 64, 80, 1, 73),
             c("Conv2d_4a_3x3", 80, 192, 3, 73, 1, 0)]
    specs += _inception_a("Mixed_5b", 192, 32) + _inception_a("Mixed_5c", 256, 64) + _inception_a("Mixed_5d", 288, 64)
    specs += [c("Mixed_6a.b3x3", 288, 384, 3, 35, 2, 0), c("Mixed_6a.b3x3dbl_1", 288, 64, 1, 35),
              c("Mixed_6a.b3x3dbl_2", 64, 96, 3, 35), c("Mixed_6a.b3x3dbl_3", 96, 96, 3, 35, 2, 0)]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        specs += _inception_c(name, c7)
    specs += [c("Mixed_7a.b3x3_1", 768, 192, 1, 17), c("Mixed_7a.b3x3_2", 192, 320, 3, 17, 2, 0),
              c("Mixed_7a.b7x7x3_1", 768, 192, 1, 17), c("Mixed_7a.b7x7x3_2", 192, 192, (1, 7), 17),
              c("Mixed_7a.b7x7x3_3", 192, 192, (7, 1), 17), c("Mixed_7a.b7x7x3_4", 192, 192, 3, 17, 2, 0)]
    specs += _inception_e("Mixed_7b", 1280) + _inception_e("Mixed_7c", 2048)
    specs.append(LayerSpec.linear("fc", 2048, 1000, batch))
    for s in specs:
        s.batch = batch if s.kind == "conv" else s.batch
    return specs


def network_specs(name: str, image_size: int | None = None, batch: int = 1) -> list[LayerSpec]:
    """Layer calls of "resnet50", "vgg16" (224x224 by default) or "inception_v3" (299x299 only)."""
    if name == "inception_v3":
        if image_size not in (None, 299):
            raise ValueError("inception_v3_specs is written for 299x299 inputs only")
        return inception_v3_specs(batch)
    size = image_size or 224
    with torch.device("meta"):
        if name == "resnet50":
            model = resnet50()
        elif name == "vgg16":
            model = vgg16(image_size=size)
        else:
            raise ValueError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")
    return [s for s, _ in extract_layers(model, (batch, 3, size, size))]


def random_block_grid(spec: LayerSpec, sparsity: float, block=(8, 8), generator=None) -> torch.Tensor | None:
    """A (Co/bo, Ci/bi) bool grid with exactly round(sparsity * blocks) False, or None if blocks do not divide."""
    bo, bi = block
    if spec.groups != 1 or spec.co % bo or spec.ci % bi:
        return None
    r, c = spec.co // bo, spec.ci // bi
    keep = torch.ones(r * c, dtype=torch.bool)
    keep[torch.randperm(r * c, generator=generator)[:round(sparsity * r * c)]] = False
    return keep.view(r, c)


def sparse_grids(specs, sparsity: float, block=(8, 8), seed: int = 0, dense_first: bool = True) -> list:
    """One random grid per spec (None for the first conv when dense_first, and where blocks do not divide)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(specs):
        out.append(None if (dense_first and i == 0) else random_block_grid(s, sparsity, block, g))
    return out


def aie2_table(arrays=((2, 2), (4, 4), (8, 8)), sparsity: float = 0.5, networks=NETWORKS, seed: int = 0,
               target="aie2") -> list[dict]:
    """Rows per network and array: dense and sparse ms, our speed-up, and the published range (SPEC 5).

    ``speedup`` uses the profile as shipped (a sparse layer may reuse its dense split when faster);
    ``speedup_rule_only`` plans every layer by the W, Co, Ci rule alone (``reuse_dense_tiling: false``).
    """
    rows = []
    for net in networks:
        specs = network_specs(net)
        grids = sparse_grids(specs, sparsity, seed=seed)
        fmts = []
        for grid in grids:
            d = None if grid is None else float(grid.float().mean())
            fmts.append(None if grid is None else LayerFormat("block", 1 - d, 1 - d, d))
        for arr in arrays:
            res = {}
            for variant, reuse in (("", True), ("_rule_only", False)):
                tgt = load_target(target, array=list(arr), reuse_dense_tiling=reuse)
                ests = [estimate_layer(s, f, tgt, g, with_subvolumes=False) for s, f, g in zip(specs, fmts, grids)]
                res["dense" + variant] = sum(e.dense_time_s for e in ests)
                res["sparse" + variant] = sum(e.time_s for e in ests)
                res["dbytes"] = sum(e.dense_bytes_moved for e in ests)
                res["sbytes" + variant] = sum(e.bytes_moved for e in ests)
            pub = PUBLISHED[net]
            rows.append({"network": net, "array": f"{arr[0]}x{arr[1]}", "layers": len(specs),
                         "dense_ms": res["dense"] * 1e3, "sparse_ms": res["sparse"] * 1e3,
                         "speedup": res["dense"] / res["sparse"],
                         "sparse_ms_rule_only": res["sparse_rule_only"] * 1e3,
                         "speedup_rule_only": res["dense_rule_only"] / res["sparse_rule_only"],
                         "dense_mb_moved": res["dbytes"] / 1e6, "sparse_mb_moved": res["sbytes"] / 1e6,
                         "published_speedup": f"{pub['speedup'][0]:.2f}-{pub['speedup'][1]:.2f}x",
                         "published_note": pub["note"]})
    return rows


def format_aie2_table(rows) -> str:
    """The aie2_table rows as a Markdown table."""
    head = ["network", "array", "dense ms", "sparse ms", "speed-up", "speed-up (rule only)", "MB moved dense -> sparse",
            "published speed-up (2x2..8x8)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pub = r["published_speedup"] + (f" ({r['published_note']})" if r["published_note"] else "")
        lines.append(f"| {r['network']} | {r['array']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['speedup_rule_only']:.2f}x | {r['dense_mb_moved']:.1f} -> "
                     f"{r['sparse_mb_moved']:.1f} | {pub} |")
    return "\n".join(lines)
