"""W * mask and SR-STE's backward as opaque ops for the graphs torch.compile traces on the CPU.

Inductor's CPU code for an elementwise op with a bool operand runs a scalar loop: measured on a GPT's
16 Linear weights (3.2M), ``w * mask`` compiled took 4.4-5.6 ns per weight, the C++ kernel of
``native_prune`` 0.8 (with a float32 mask inductor took 1.1-1.6, at 4 bytes per weight more). In a
compiled GPT step the forward product and the backward's ``grad * mask`` came to about 7% of the step.
These ops call that kernel when the graph runs (the torch expression where it does not apply: the
same values). Only 2-D weights take them: for a 4-D conv weight inductor would convert the operands
to and from its channels-last layout around an opaque op (``nn.masked``'s ``mask_cl`` keeps conv masks
in that layout instead).
"""

from __future__ import annotations

import torch

from .native_prune import DTYPES, masked_weight_native, srste_grad_native

__all__ = ["masked_weight_op", "srste_grad_op", "compiled_op_takes"]


def compiled_op_takes(w: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether a traced ``w * mask`` goes to ``masked_weight_op``: a contiguous 2-D CPU float weight and a bool mask of
    its shape. Whether the kernel is built is not asked here (loading it takes a lock, which Dynamo cannot trace):
    without a build the op computes the torch expression, the same values."""
    return (w.device.type == "cpu" and w.dim() == 2 and w.dtype in DTYPES and mask.dtype == torch.bool
            and mask.shape == w.shape and w.is_contiguous() and mask.is_contiguous())


def _check(mask: torch.Tensor, *like: tuple[str, torch.Tensor]) -> None:
    """The ops' contract (their fake functions promise an output like the first tensor): a bool mask and tensors of
    the mask's shape and of one float dtype."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    for name, t in like:
        if t.shape != mask.shape:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match the mask's {tuple(mask.shape)}")
        if t.dtype != like[0][1].dtype:
            raise ValueError(f"{name} is {t.dtype}, {like[0][0]} is {like[0][1].dtype}: give both one dtype")


@torch.library.custom_op("nmsparse::masked_weight_cpu", mutates_args=())
def masked_weight_op(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w * mask`` for a bool mask by the kernel (one pass). Differentiable in w: the gradient is ``grad * mask``."""
    _check(mask, ("w", w))
    out = masked_weight_native(w, mask)
    return out if out is not None else (w * mask).contiguous()


@masked_weight_op.register_fake
def _masked_weight_fake(w, mask):
    _check(mask, ("w", w))
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _masked_weight_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _masked_weight_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return masked_weight_op(grad.contiguous(), mask), None


masked_weight_op.register_autograd(_masked_weight_backward, setup_context=_masked_weight_setup)


@torch.library.custom_op("nmsparse::srste_grad_cpu", mutates_args=())
def srste_grad_op(grad: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """SR-STE's weight gradient ``grad + decay * w.masked_fill(mask, 0)`` by the kernel (one pass)."""
    _check(mask, ("grad", grad), ("w", w))
    out = srste_grad_native(grad, w, mask, decay)
    return out if out is not None else (grad + decay * w.masked_fill(mask, 0)).contiguous()


@srste_grad_op.register_fake
def _srste_grad_fake(grad, w, mask, decay):
    _check(mask, ("grad", grad), ("w", w))
    return torch.empty_like(grad, memory_format=torch.contiguous_format)
