"""A classifier's test loss and top-1 accuracy over a loader, optionally under autocast and flip averaging."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..data import normalize_uint8

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast_dtype(amp: str, device: torch.device):
    """The autocast dtype of an ``amp`` setting ("auto": bf16 on CUDA, off elsewhere), or None for none."""
    return AMP_DTYPES[amp if amp != "auto" else ("bf16" if device.type == "cuda" else "off")]


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype=None, tta_flip: bool = False) -> dict:
    """Test loss and top-1 accuracy (%), with left-right flip averaging when tta_flip."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # imagefolder batches
            x = normalize_uint8(x, device)
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(x.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    return {"test_loss": float(loss_sum) / max(count, 1), "test_acc": 100.0 * float(correct) / max(count, 1)}
