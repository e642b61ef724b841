"""The state and step logic shared by the weight sparsity parametrizations of ``nn.weight``.

What a step is, when a mask changes and what the state holds: nn/weight.py's module docstring.
``nn.mask_step`` drives the optimizer-step mode from a model (``attach``, ``step_masks``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..kernels.compiled_masking import compiled_op_takes, masked_weight_op, srste_grad_op
from ..kernels.native_prune import masked_weight_native, srste_grad_native
from .layers import weight_in_out
from .profiling import MASK, MASKING, scope

FORWARD, OPTIMIZER = "forward", "optimizer"  # what advances `step`: training forwards, or optimizer steps


def _whole(w: torch.Tensor) -> torch.Tensor:
    """The whole dense weight, detached. Outside forward an FSDP2-sharded (DTensor) weight is this rank's shard: it is
    gathered (a collective; every rank steps the same layers, and a due update is due on all of them)."""
    w = w.detach()
    return w.full_tensor() if hasattr(w, "full_tensor") and hasattr(w, "placements") else w


class _StraightThrough(torch.autograd.Function):
    """W * mask forward; backward passes the dense gradient plus decay * (1 - mask) * W (SR-STE)."""

    @staticmethod
    def forward(ctx, w, mask, decay):
        ctx.decay = decay
        if decay:
            ctx.save_for_backward(w, mask)
        return multiply(w, mask)

    @staticmethod
    def backward(ctx, grad):
        if ctx.decay:
            w, mask = ctx.saved_tensors
            if _traced_for_compile() and grad.dtype == w.dtype and compiled_op_takes(w, mask):
                return srste_grad_op(grad.contiguous(), w, mask, ctx.decay), None, None
            if mask.dtype == torch.uint8:  # a traced conv mask (_traced_mask): a product inductor vectorizes
                return grad + ctx.decay * (w * (1 - mask)), None, None
            with scope(MASKING):
                # one pass on the CPU; with create_graph the torch expression, which records its graph
                fused = None if torch.is_grad_enabled() else srste_grad_native(grad, w, mask, ctx.decay)
                if fused is not None:
                    return fused, None, None
                grad = grad + ctx.decay * w.masked_fill(mask, 0)
        return grad, None, None


class _Masked(torch.autograd.Function):
    """W * mask forward, grad * mask backward (a frozen mask): each one C++ pass on the CPU."""

    @staticmethod
    def forward(ctx, w, mask):
        ctx.save_for_backward(mask)
        return multiply(w, mask)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        with scope(MASKING):  # the profile's "masking" share counts the backward pass too
            return multiply(grad, mask), None


def _traced_for_compile() -> bool:
    """Traced by torch.compile, not by torch.export: an exported program keeps plain torch ops (no nmsparse op that
    its loader, ONNX or AOTInductor would need to know)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def multiply(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w * mask: in one C++ pass where nothing records a graph through it (same values), else by torch. Traced by
    torch.compile, a 2-D CPU weight's product is the opaque op that runs that pass (``kernels.compiled_masking``)."""
    if torch.compiler.is_compiling():  # asked once: every eager forward of a masked layer passes here
        if not torch.compiler.is_exporting() and compiled_op_takes(w, mask):
            return masked_weight_op(w, mask)
        return w * mask  # export, or a weight the op does not take
    if not (torch.is_grad_enabled() and w.requires_grad):
        out = masked_weight_native(w, mask)
        if out is not None:
            return out
    return w * mask


def masked_product(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w * mask with the gradient grad * mask: the C++ passes on a CPU weight (under torch.compile for 2-D weights,
    through the op of ``multiply``), plain torch elsewhere."""
    if torch.compiler.is_compiling():
        return multiply(w, mask)
    if w.device.type != "cpu":
        return w * mask
    return _Masked.apply(w, mask)


class _MaskedWeight(nn.Module):
    """Shared state and step logic; subclasses say how to compute a mask and when one is due."""

    def __init__(self):
        super().__init__()
        # 1-D and empty until the first forward, which learns W's (2-D or 4-D) shape.
        self.register_buffer("mask", torch.ones(0, dtype=torch.bool))
        # A conv mask's channels-last uint8 copy, which compiled graphs read (_traced_mask); None for other masks.
        self.register_buffer("mask_cl", None, persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.in_out = False  # W stored (in, out), as transformers' Conv1D: the hooks see W^T (see orient)
        self.pending = True  # the update of `step` may not be in `mask` yet (optimizer mode applies it before use)
        self.steps_by = FORWARD  # FORWARD or OPTIMIZER: not saved, a property of the training loop
        self.attached_to = None  # weakref to the optimizer whose step hook steps it (nn.mask_step.attach)
        self._counting_from = 0  # `step` when forward counting last began (step_masks' warning)

    def orient(self, module: nn.Module, tensor: str = "weight") -> "_MaskedWeight":
        """Set up for the layout of module.<tensor> (``nn.layers.weight_in_out``); returns self. ``apply`` and
        ``sparsify`` call it; a parametrization registered by hand on a Conv1D needs it before registering."""
        self.in_out = weight_in_out(module, tensor)
        return self

    def _view(self, t):
        """W's layout <-> the (out, in) view the subclass hooks work in (a transpose for (in, out) weights)."""
        return t.t() if self.in_out else t

    # Subclass hooks: they take and return tensors in the (out, in) view.
    def _initial(self, w):  # the mask set up at the first forward or by reset_mask
        return self._compute(w)

    def _compute(self, w):  # the mask a due update computes
        raise NotImplementedError

    def _due(self) -> bool:  # whether the step numbered self.step updates the mask
        raise NotImplementedError

    def _eval_mask(self, w):  # the mask used by a forward that is not a training forward
        return self._view(self._traced_mask())

    def _traced_mask(self) -> torch.Tensor:
        """The mask a forward multiplies by: under torch.compile, a conv mask's channels-last uint8 copy. Inductor
        lays a convolution's weight out channels-last, and with it every 4-D input that feeds one, so it copied each
        contiguous bool mask into that layout at every step, element by element: ~0.5 s of a 2.6 s ResNet-18 step
        (measured; ~0.08 s with the copy kept in that layout). uint8, not bool: inductor's CPU code runs a scalar
        loop for a bool operand and vector code for uint8; measured on ResNet-18's 3x3 conv weights (1 thread),
        w * mask 4.56 ns per weight with a bool mask, 0.72 with uint8; SR-STE's backward 5.64 and 0.97 (the
        same values; for a finite weight, w * (1 - mask) is w.masked_fill(mask, 0))."""
        if self.mask_cl is not None and torch.compiler.is_compiling():
            return self.mask_cl
        return self.mask

    def _sync_cl(self, in_place: bool = False) -> None:
        """mask_cl from mask: rebound as _set rebinds mask, or (in_place: advance, a loaded state) copied into, as
        advance copies into mask, so that a captured graph keeps reading the same buffer."""
        m, old = self.mask, self.mask_cl
        if not (m.dim() == 4 and m.shape[2] * m.shape[3] > 1):  # a 1x1 kernel's mask is channels-last already
            self.mask_cl = None
        elif in_place and old is not None and old.shape == m.shape and old.device == m.device and \
                old.dtype == torch.uint8 and old.data_ptr() != m.data_ptr():
            old.copy_(m)
        else:
            self.mask_cl = m.to(dtype=torch.uint8, memory_format=torch.channels_last)

    def _multiply(self, w, mask):
        return masked_product(w, mask)

    def eval_mask(self, w: torch.Tensor) -> torch.Tensor:
        """The mask a forward that is not a training forward applies to w."""
        return self._view(self._eval_mask(self._view(w)))

    def initial_mask(self, w: torch.Tensor) -> torch.Tensor:
        """The mask the first forward (or reset_mask) would set up from w."""
        return self._view(self._initial(self._view(w.detach()))).to(torch.bool)

    def check_weight(self, shape, name: str = "weight") -> None:
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mask.shape != w.shape:
            if self._ready():
                raise ValueError(f"weight of shape {tuple(w.shape)} does not match the mask of shape "
                                 f"{tuple(self.mask.shape)} this parametrization was set up for")
            self.check_weight(w.shape)
            self._set(self._view(self._initial(self._view(w))))
            mask = self._traced_mask()
        elif self.training and torch.is_grad_enabled():
            if self.steps_by == FORWARD:
                self._count_forward(w)
            elif self.pending:  # a state saved or switched before its update: once, then forwards read only
                self._apply_pending(w)
            mask = self._traced_mask()
        else:
            with scope(MASK):
                mask = self.eval_mask(w)
        with scope(MASKING):
            return self._multiply(w, mask)

    @property
    def attached(self) -> bool:
        """Whether a live optimizer's step hook steps this parametrization (``nmsparse.attach``)."""
        return self.attached_to is not None and self.attached_to() is not None

    def _count_forward(self, w) -> None:
        """Forward mode: this training forward is step `step`: apply its update (if due), then count it."""
        if self._due():
            with scope(MASK):
                self._set(self._view(self._compute(self._view(w))))
        self.step += 1
        self.pending = True  # the update of the new count waits for the next forward (or an optimizer step)

    def _apply_pending(self, w) -> None:
        """The update of `step` from w, if due, without counting. Applying it again from the W it was computed from
        leaves the mask as it is (a state dict does not say whether it was saved before or after the update)."""
        with torch.no_grad():
            if self._due():
                with scope(MASK):
                    self._set(self._view(self._compute(self._view(_whole(w)))))
        self.pending = False

    @torch.no_grad()
    def count_optimizer_steps(self, w: torch.Tensor) -> None:
        """From now on count optimizer steps (``advance``), not training forwards; applies an update the state
        left pending from w, the current dense weight (its Parameter). ``nmsparse.attach`` calls it."""
        self._require_mask()
        self.steps_by = OPTIMIZER
        if self.pending:
            self._apply_pending(w)

    @torch.no_grad()
    def advance(self, w: torch.Tensor) -> int:
        """One optimizer step, after the optimizer wrote w (the dense weight's Parameter): count it and apply the
        update due at the new count, computed from w. ``step_masks`` and ``attach``'s optimizer hook call it.

        Called on a parametrization that still counts training forwards, it switches to optimizer steps: the
        forwards of the optimizer step that just ended were counted already, so it only applies the pending
        update. Returns how many steps were counted since forward counting began (the caller warns if > 1).
        """
        self._require_mask()
        switching, counted = self.steps_by == FORWARD, 0
        if switching:
            self.steps_by = OPTIMIZER
            counted = int(self.step) - self._counting_from
        if self.pending:
            self._apply_pending(w)
            if switching:
                return counted
        self.step += 1
        if self._due():
            with scope(MASK):
                new = self._view(self._compute(self._view(_whole(w)))).to(torch.bool)
            if new.shape == self.mask.shape and new.device == self.mask.device:
                self.mask.copy_(new)  # in place: a compiled graph or a CUDA graph keeps reading the same buffer
                self._sync_cl(in_place=True)
            else:
                self._set(new)
        return counted

    def _require_mask(self) -> None:
        if not self._ready():
            raise RuntimeError(f"{type(self).__name__} has no mask yet: register it on a module "
                               f"(nmsparse.nn.weight.apply) or call reset_mask(W)")

    def _ready(self) -> bool:
        return self.mask.dim() != 1

    def _set(self, mask: torch.Tensor) -> None:
        # Rebind rather than copy_: a mask saved for a pending backward must not change under it.
        self.mask = mask.to(torch.bool).contiguous()
        self._sync_cl()

    @torch.no_grad()
    def reset_mask(self, w: torch.Tensor) -> torch.Tensor:
        """Recompute the mask from w now (step unchanged), as the first forward would; returns it.

        Call it after registering, e.g. ``p.reset_mask(module.parametrizations.weight.original)``
        (called before, it would make the registration's check forward count as a step).
        """
        self.check_weight(w.shape)
        self._set(self.initial_mask(w))
        return self.mask

    def density(self) -> float:
        """Fraction of weights the current mask keeps."""
        self._require_mask()
        return float(self.mask.sum()) / max(self.mask.numel(), 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "mask")
        if saved is not None and not self._ready() and saved.shape != self.mask.shape:
            self.mask = torch.empty(saved.shape, dtype=torch.bool, device=self.mask.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_cl(in_place=True)
        if prefix + "step" in state_dict:
            # Saved before or after the update of its step: applying it again from the same W changes nothing.
            self.pending = True
            self._counting_from = int(self.step)

    def __getstate__(self):
        # A copy (deepcopy, pickle) is attached to no optimizer: it counts training forwards until attached.
        state = dict(super().__getstate__(), attached_to=None)
        if state.get("steps_by") == OPTIMIZER:
            state.update(steps_by=FORWARD, _counting_from=int(self.step))
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # Pickled by an earlier release: it counted training forwards.
        for name, value in (("pending", True), ("steps_by", FORWARD), ("attached_to", None)):
            self.__dict__.setdefault(name, value)
        self.__dict__.setdefault("_counting_from", int(self.step))
        if "mask_cl" not in self._buffers:
            self.register_buffer("mask_cl", None, persistent=False)
            self._sync_cl()

    def extra_repr(self) -> str:
        return self.pattern_name()


def warn_counted_forwards(counted: dict[str, int]) -> None:
    """The warning of step_masks on layers that counted several training forwards before it first ran."""
    if counted:
        names = ", ".join(f"{k} ({v})" for k, v in list(counted.items())[:4]) + (", ..." if len(counted) > 4 else "")
        warnings.warn(f"nmsparse.step_masks: these layers counted several training forwards as steps before its "
                      f"first call: {names}; they count optimizer steps from now on. If those forwards were "
                      f"micro-batches of one optimizer step (gradient accumulation) or recomputed forwards "
                      f"(activation checkpointing), the schedules ran ahead: call nmsparse.attach(model, optimizer) "
                      f"(or attach(model) before calling step_masks yourself) before training", stacklevel=4)
