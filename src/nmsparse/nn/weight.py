"""Weight sparsity as parametrizations: N:M (SR-STE, STE, fixed; optionally transposable) and blocks.

Register with ``apply(module, p)`` (or ``torch.nn.utils.parametrize.register_parametrization``);
``module.weight`` then reads W * mask and the dense W lives in
``module.parametrizations.weight.original``. Each parametrization keeps two persistent buffers:

- ``mask``: bool, W's shape (as W is stored): the mask training forwards apply;
- ``step``: int64 scalar: the number of training steps taken so far.

**What a step is.** A mask update belongs to a step t and is computed from the W that t optimizer
steps wrote; whether step t updates the mask depends on the method and on t alone (SR-STE/STE:
every step; transposable: multiples of ``recompute_every``; gradual blocks: the schedule).

- Attached (``nmsparse.attach(model, optimizer)``, which registers an optimizer step post-hook, or
  ``attach(model)`` plus ``nmsparse.step_masks(model)`` after every optimizer step): a step is one
  optimizer step. Right after the optimizer writes W, the step is counted and the update due at the
  new count is computed from that W. Forwards only apply the mask (SR-STE's straight-through
  function with its decay term included): the micro-batches of gradient accumulation, forwards that
  activation checkpointing runs again in backward and evaluation all see the same mask, and
  ``torch.compile`` finds no host read and nothing that changes between steps. An optimizer step a
  gradient scaler skips (inf/NaN) is not called, so it does not count.
- Not attached (the default, as in earlier releases): a step is a training forward, one in
  training mode with autograd enabled. It applies the update of the current count, then counts.
  Every micro-batch and every recomputed forward counts, so with gradient accumulation or
  activation checkpointing the schedules run ahead: attach. ``step_masks`` on a model that is
  not attached switches its layers to optimizer steps (exact for one forward per optimizer step;
  it warns when a layer counted several forwards before its first call).

In a loop of one forward and one optimizer step per iteration both give identical masks and
weights: the update a forward would compute at the start of iteration t+1 is the one the optimizer
step of iteration t computes from the same W. State dicts are the same in both modes (and as in
earlier releases), saved on either side of that moment: after a load, the update of the loaded step
is applied again before the mask is next used (by ``attach`` or by the next training forward),
which changes nothing when it had been applied (the same W gives the same mask), so a state dict
resumes exactly in either mode, and so does a model attached mid-training.

The very first forward (the shape check that registration runs) only sets the mask up from W and
does not count; the update of step 0 is then pending: ``attach`` applies it from the W of that
moment (call it once the weights are final: after loading pretrained ones), an unattached model's
first training forward from the W it sees. Forwards in eval mode, under
``torch.no_grad()`` or ``torch.inference_mode()`` neither count nor change the mask. A copy of the
model (``copy.deepcopy``, pickling) counts training forwards until it is attached itself.

Masks are computed on W's (out, in[, kh, kw]) view. For a weight stored (in, out), as
transformers' Conv1D stores it (``nn.layers``), that view is W^T: ``apply`` and ``sparsify`` set
the parametrization up for its layer's layout (``orient``), so N:M groups run along the input
features there too.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..kernels.native_prune import nm_mask_native  # one pass in C++ on the CPU (None elsewhere)
from ..kernels.transposable import transposable_mask  # the compiled exact solver on the CPU, else PyTorch
from ..patterns.checks import check_fraction, check_nm
from ..patterns.block import check_block, check_score, check_block_weight, block_scores, expand_block_grid
from ..patterns.nm import nm_mask_checked
from ..patterns.transposable import conv_from_2d, conv_to_2d
from .masked import _MaskedWeight, _StraightThrough, masked_product

NM_METHODS = ("srste", "ste", "fixed")
MASK_METHODS = ("exact", "greedy")
SCHEDULES = ("oneshot", "gradual")


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {name}={value}")
    return value


def _check_number(value, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {name}={value}")
    return float(value)


def _check_rank(shape, name: str) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) not in (2, 4):
        raise ValueError(f"{name} must be a 2-D Linear weight (out, in) or a 4-D Conv2d weight "
                         f"(Co, Ci, kh, kw), got shape {shape}")
    return shape


def check_nm_settings(n, m, method="srste", decay=2e-4, transposable=False, mask_method="exact",
                      recompute_every=40) -> tuple:
    """The N:M weight settings, validated (TypeError/ValueError naming the argument), in constructor order."""
    n, m = check_nm(n, m)
    if n == 0:
        raise ValueError("n must be >= 1 for weight sparsity (n=0 would zero the whole weight), got n=0")
    if method not in NM_METHODS:
        raise ValueError(f"method must be one of {NM_METHODS}, got method={method!r}")
    if not isinstance(transposable, bool):
        raise TypeError(f"transposable must be a bool, got {transposable!r}")
    if mask_method not in MASK_METHODS:
        raise ValueError(f"mask_method must be one of {MASK_METHODS}, got mask_method={mask_method!r}")
    return (n, m, method, _check_number(decay, "decay"), transposable, mask_method,
            _check_int(recompute_every, "recompute_every", 1))


def check_block_settings(block=(8, 8), sparsity=0.5, score="l2", schedule="oneshot", start_step=0, end_step=None,
                         every=100, power=3) -> tuple:
    """The block weight settings, validated (TypeError/ValueError naming the argument), in constructor order."""
    block = check_block(block)
    sparsity = check_fraction(sparsity, "sparsity")
    score = check_score(score)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got schedule={schedule!r}")
    start_step = _check_int(start_step, "start_step", 0)
    if end_step is None:
        if schedule == "gradual":
            raise ValueError("schedule='gradual' needs end_step > start_step, got end_step=None")
    else:
        _check_int(end_step, "end_step", start_step + 1)
    return (block, sparsity, score, schedule, start_step, end_step, _check_int(every, "every", 1),
            _check_number(power, "power", positive=True))


class NMWeightSparsity(_MaskedWeight):
    """N:M weights along the input channels: SR-STE, plain STE or a fixed mask; optionally transposable.

    Groups are m consecutive input features of a Linear weight (out, in), or m consecutive
    input channels at each (co, kh, kw) of a Conv2d weight, i.e. ``nm_mask(W, n, m, dim=1)``.
    - "srste": mask recomputed from W at every training step; backward: dense gradient
      plus decay * (1 - mask) * W. "ste": the same with no decay.
    - "fixed": mask chosen at the first forward (or by ``reset_mask``) and frozen; gradient masked.
    - transposable=True: the mask is ``transposable_mask`` of the 2-D view (Linear: W; Conv:
      ``conv_to_2d(W)``) by ``mask_method``, recomputed at the training steps that are multiples
      of ``recompute_every`` (srste/ste; "fixed" freezes it).
    Forwards that are not training steps use the stored mask, except srste/ste without
    transposable, whose mask is a function of W and is recomputed from it (not stored).
    """

    def __init__(self, n: int = 2, m: int = 4, method: str = "srste", decay: float = 2e-4,
                 transposable: bool = False, mask_method: str = "exact", recompute_every: int = 40):
        super().__init__()
        self.n, self.m, self.method, self.decay, self.transposable, self.mask_method, self.recompute_every = \
            check_nm_settings(n, m, method, decay, transposable, mask_method, recompute_every)

    def check_weight(self, shape, name: str = "weight") -> None:
        """Raise ValueError (naming the dim, its size and m) if W of this shape cannot be grouped."""
        stored = shape = _check_rank(shape, name)
        conv = len(shape) == 4
        d_in, d_out = (0, 1) if self.in_out else (1, 0)
        shape = self._view(torch.empty(shape, device="meta")).shape
        dims = [(f"dim {d_in}", "input channels" if conv else "input features", shape[1])]
        if self.transposable:
            rows = (f"dim {d_out}", "output channels" if conv else "output features", shape[0])
            if conv:  # the columns of the (Co, kh*kw*Ci) view that the tiles cover
                dims[0] = ("kh*kw*Ci", f"columns of the (Co, kh*kw*Ci) view, {shape[2]}*{shape[3]}*{shape[1]}",
                           shape[1] * shape[2] * shape[3])
            dims.insert(0, rows)
        for where, what, size in dims:
            if size % self.m:
                kind = f"transposable {self.n}:{self.m} tiles" if self.transposable else f"{self.n}:{self.m} groups"
                raise ValueError(
                    f"{name} of shape {stored}: {where} ({what}) has size {size}, which is not divisible "
                    f"by m={self.m} for {kind}; pad it to a multiple of {self.m} or choose an m that divides {size}")

    def _compute(self, w):
        w = w.detach()
        if not self.transposable:  # n, m and the shape were checked when built
            mask = nm_mask_native(w, self.n, self.m, 1)
            return nm_mask_checked(w, self.n, self.m, 1) if mask is None else mask
        if w.dim() == 2:
            return transposable_mask(w, self.n, self.m, self.mask_method)
        return conv_from_2d(transposable_mask(conv_to_2d(w), self.n, self.m, self.mask_method), w.shape)

    def _due(self) -> bool:
        if self.method == "fixed":
            return False
        return not self.transposable or int(self.step) % self.recompute_every == 0

    def _eval_mask(self, w):
        if self.method != "fixed" and not self.transposable:
            return self._compute(w)
        return self._view(self._traced_mask())

    def _multiply(self, w, mask):
        if self.method == "fixed":
            return masked_product(w, mask)
        return _StraightThrough.apply(w, mask, self.decay if self.method == "srste" else 0.0)

    def pattern_name(self) -> str:
        """E.g. "2:4 srste", "4:8-T exact" (transposable srste), "2:4-T greedy fixed"."""
        if not self.transposable:
            return f"{self.n}:{self.m} {self.method}"
        name = f"{self.n}:{self.m}-T {self.mask_method}"
        return name if self.method == "srste" else f"{name} {self.method}"


class BlockWeightSparsity(_MaskedWeight):
    """Zeroed bo x bi blocks of (out, in) channels spanning the whole kernel; gradient masked.

    - "oneshot": the lowest-scoring round(sparsity * blocks) blocks are chosen at the first
      forward (or by ``reset_mask``) and stay zero.
    - "gradual": target sparsity s(t) = sparsity * (1 - (1 - (t - start_step) / (end_step -
      start_step)) ** power) between start_step and end_step (Zhu & Gupta); at the training
      steps start_step + k * every (and at end_step) the lowest-scoring live blocks are zeroed
      until round(s(t) * blocks) are zero. Zeroed blocks never come back.
    """

    def __init__(self, block=(8, 8), sparsity: float = 0.5, score: str = "l2", schedule: str = "oneshot",
                 start_step: int = 0, end_step: int | None = None, every: int = 100, power: float = 3):
        super().__init__()
        (self.block, self.sparsity, self.score, self.schedule, self.start_step, self.end_step, self.every,
         self.power) = check_block_settings(block, sparsity, score, schedule, start_step, end_step, every, power)

    def check_weight(self, shape, name: str = "weight") -> None:
        """Raise ValueError (naming the dim, its size and the block) if W of this shape cannot be blocked."""
        stored = _check_rank(shape, name)
        try:
            check_block_weight(self._view(torch.empty(stored, device="meta")), self.block, name)
        except ValueError as e:
            if not self.in_out:
                raise
            raise ValueError(f"{e} (of the (out, in) view of the weight, which is stored (in, out): "
                             f"shape {stored})") from None

    def target_sparsity(self, step: int) -> float:
        """Fraction of blocks that should be zero at a training step."""
        if self.schedule == "oneshot":
            return self.sparsity
        t0, t1 = self.start_step, self.end_step
        frac = min(max((step - t0) / (t1 - t0), 0.0), 1.0)
        return self.sparsity * (1.0 - (1.0 - frac) ** self.power)

    def _grid(self) -> torch.Tensor:
        """The (Co/bo, Ci/bi) kept-block grid of the current mask."""
        mask = self._view(self.mask) if self.mask.dim() == 2 else self.mask[:, :, 0, 0]
        return mask[:: self.block[0], :: self.block[1]]

    def _prune(self, w, grid):
        """Zero the lowest-scoring live blocks of grid until round(s(step) * blocks) are zero."""
        scores = block_scores(w.detach(), self.block, self.score).flatten()
        grid = grid.flatten().clone()
        more = round(self.target_sparsity(int(self.step)) * grid.numel()) - int((~grid).sum())
        if more > 0:
            live = grid.nonzero().squeeze(1)
            order = torch.argsort(scores[live.to(scores.device)], stable=True)  # ties: earlier block
            grid[live[order[:more].to(live.device)]] = False
        return grid

    def _initial(self, w):
        bo, bi = self.block
        grid = torch.ones((w.shape[0] // bo, w.shape[1] // bi), dtype=torch.bool, device=w.device)
        return expand_block_grid(self._prune(w, grid).view(grid.shape), w.shape, self.block)

    def _compute(self, w):
        grid = self._grid()
        return expand_block_grid(self._prune(w, grid).view(grid.shape), w.shape, self.block)

    def _due(self) -> bool:
        if self.schedule == "oneshot":
            return False
        t = int(self.step)
        return self.start_step <= t <= self.end_step and ((t - self.start_step) % self.every == 0
                                                          or t == self.end_step)

    def pattern_name(self) -> str:
        """E.g. "block 8x8 50% l2" (with " gradual" for the gradual schedule)."""
        name = f"block {self.block[0]}x{self.block[1]} {self.sparsity * 100:g}% {self.score}"
        return name if self.schedule == "oneshot" else f"{name} gradual"


_TYPES = (NMWeightSparsity, BlockWeightSparsity)


def find_parametrization(module: nn.Module, name: str = "weight"):
    """The NMWeightSparsity / BlockWeightSparsity on module.<name>, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, _TYPES)), None)


def apply(module: nn.Module, parametrization: _MaskedWeight, name: str = "weight") -> nn.Module:
    """Register ``parametrization`` on ``module.<name>`` (oriented for its layout, checked, unsafe=False); returns
    module."""
    if not isinstance(parametrization, _TYPES):
        raise TypeError(f"parametrization must be an NMWeightSparsity or BlockWeightSparsity, "
                        f"got {type(parametrization).__name__}")
    if find_parametrization(module, name) is not None:
        raise ValueError(f"{type(module).__name__}.{name} already has a weight sparsity parametrization")
    parametrization.orient(module, name).check_weight(getattr(module, name).shape, name)
    parametrize.register_parametrization(module, name, parametrization, unsafe=False)
    return module


def current_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The current mask (bool, the weight's shape) of a module with a weight sparsity parametrization."""
    p = find_parametrization(module, name)
    if p is None:
        raise ValueError(f"{type(module).__name__}.{name} has no NMWeightSparsity or BlockWeightSparsity "
                         f"parametrization")
    return p.mask
