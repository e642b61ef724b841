"""`nmsparse bench gpu`, whole training steps (bf16 weights, SGD with momentum) of vit_tiny, a
ViT-B/16 and ResNet-50 (channels_last): dense vs SDGP 2:4 rescale vs transposable 2:4 weights
(WeightNM kernel="auto": Linears on sparse tensor cores where measured faster) vs both, each model
sparsified by ``nmsparse.sparsify`` with the default filter (convs with > 3 input channels and
every Linear but the classifier), as training does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .gpu_block import Variant, layer_counts, sparsify_variant
from .gpu_env import Timer, err_text, fmt_ms, fmt_x
from ..common.text import markdown_table

__all__ = ["TRAIN_VARIANTS", "bench_train", "train_table"]

TRAIN_VARIANTS = [Variant(), Variant(sdgp="rescale"), Variant(weight=True), Variant(weight=True, sdgp="rescale")]


def _train_models(device, quick: bool):
    from ..models import ViT, resnet50, vit_tiny

    if device.type != "cuda":
        return [("tiny ViT (dry run)", lambda: ViT(32, 8, 3, 64, 1, 2, 10), (2, 3, 32, 32), False)]
    return [
        ("vit_tiny (28x28, 1 ch)", lambda: vit_tiny(), (256 if quick else 512, 1, 28, 28), False),
        ("ViT-B/16 (224)", lambda: ViT(224, 16, 3, 768, 12, 12, 1000, 4, "cls"),
         (32 if quick else 64, 3, 224, 224), False),
        ("ResNet-50 (224, channels_last)", lambda: resnet50(), (32 if quick else 64, 3, 224, 224), True),
    ]


def bench_train(device, timer: Timer, quick: bool, log) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for name, factory, in_shape, channels_last in _train_models(device, quick):
        base = None
        for variant in TRAIN_VARIANTS:
            row = {"model": name, "batch": in_shape[0], "variant": variant.name}
            try:
                torch.manual_seed(0)
                model = factory().to(device=device, dtype=dtype)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                model = sparsify_variant(model, variant)
                row["sparse_layers"], row["core_layers"] = layer_counts(model)
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                data = [torch.randn(in_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                        for _ in range(2)]
                classes = 1000 if "ResNet" in name or "ViT-B" in name else 10
                labels = torch.randint(0, classes, (in_shape[0],), device=device)

                def step(i, model=model, opt=opt, data=data, labels=labels):
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(data[i % 2]).float(), labels)
                    loss.backward()
                    opt.step()
                    return loss.detach()

                loss = float(step(0))
                row["check"] = "ok" if math.isfinite(loss) else f"non-finite loss {loss}"
                t = timer(step)
                row["s"] = t
                row["samples_per_s"] = in_shape[0] / t
                if base is None and variant.dense:
                    base = t
                row["speedup"] = base / t if base else None
                del model, opt, data
            except Exception as e:
                row["check"] = err_text(e)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def train_table(rows) -> str:
    return markdown_table(
        ["model", "batch", "variant", "sparse layers", "2:4-core Linears", "check", "step ms", "samples/s",
         "vs dense"],
        [[r["model"], r["batch"], r["variant"], r.get("sparse_layers", "-"), r.get("core_layers", "-"),
          r.get("check", "-"), fmt_ms(r.get("s")), fmt_x(r.get("samples_per_s"), 0), fmt_x(r.get("speedup"))]
         for r in rows])
