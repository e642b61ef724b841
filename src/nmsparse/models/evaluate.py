"""A classifier's test loss and top-1 accuracy over a loader, optionally under autocast and flip averaging; a
language model's validation loss per token (nats), perplexity and next-token accuracy."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data import normalize_uint8

# The one number a run is judged by: (metric key, label, higher is better), by what evaluate() returned.
HEADLINES = (("val_loss", "validation loss (nats/char)", False), ("test_acc", "top-1 (%)", True))
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast_dtype(amp: str, device: torch.device):
    """The autocast dtype of an ``amp`` setting ("auto": bf16 on CUDA, off elsewhere), or None for none."""
    return AMP_DTYPES[amp if amp != "auto" else ("bf16" if device.type == "cuda" else "off")]


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype=None, tta_flip: bool = False) -> dict:
    """Test loss and top-1 accuracy (%), with left-right flip averaging when tta_flip; for a model that returns
    (batch, time, vocab) logits, {val_loss (nats per token), val_ppl, val_acc (% of next tokens)}."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count, sequence = 0, False
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # imagefolder batches
            x = normalize_uint8(x, device)
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if tta_flip and logits.dim() == 2:
                logits = (logits + model(x.flip(-1)).float()) / 2
        sequence = logits.dim() == 3
        logits, y = (logits.flatten(0, 1), y.flatten()) if sequence else (logits, y)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    loss, acc = float(loss_sum) / max(count, 1), 100.0 * float(correct) / max(count, 1)
    if sequence:
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_acc": acc}
    return {"test_loss": loss, "test_acc": acc}


def headline(row: dict) -> tuple[str, str, bool]:
    """(key, label, higher_is_better) of the metric that judges a run, from one evaluated metrics row."""
    for h in HEADLINES:
        if h[0] in row:
            return h
    return HEADLINES[-1]
