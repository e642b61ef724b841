"""SDGP (McDanel et al. 2022): the output gradient, pruned N:M along channels, feeds only the input gradient.

The dense output gradient still computes the weight and bias gradients, so only the
backward-data product (whose reduction runs over the output channels) becomes N:M sparse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.nn.utils import parametrize

from ..kernels import ops
from ..kernels.draws import step_key_advance
from ..kernels.ops import prune_grad_fast
from ..common.text import did_you_mean
from ..kernels.reference import PRUNE_METHODS, SEED_STRIDE, STOCHASTIC_METHODS, check_prune_nm, prune_checked
from ..patterns.checks import check_dim, check_divisible, check_float_tensor
from .profiling import GRAD_PRUNE, scope

# "tile24": 2:4 chosen by the fused prune-and-compress route of 2:4 sparse tensor cores (greedy in
# 4 positions x 4 channels tiles; a transposable pattern), which can differ from "magnitude".
SDGP_METHODS = PRUNE_METHODS + ("tile24",)

__all__ = ["prune_grad", "SDGP_METHODS", "SDGPConv2d", "SDGPLinear", "sdgp_conv2d", "sdgp_linear",
           "check_sdgp_settings"]


def check_sdgp_settings(n, m, method: str | None = None) -> tuple[int, int]:
    """SDGP's n:m (1 <= n <= m) and method, validated with messages naming the argument; returns (n, m)."""
    if method is not None and method not in SDGP_METHODS:
        raise ValueError(f"method must be one of {SDGP_METHODS}, got {method!r}{did_you_mean(method, SDGP_METHODS)}")
    n, m = check_prune_nm(n, m)
    if method == "tile24" and (n, m) != (2, 4):
        raise ValueError(f"method 'tile24' is the 2:4 tensor-core pattern: it needs n=2, m=4, got {n}:{m}")
    return n, m


def prune_grad(g: torch.Tensor, n: int, m: int, method: str = "magnitude", dim: int = 1,
               generator: torch.Generator | torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """g pruned to n:m (1 <= n <= m) in groups of m consecutive channels along `dim`, in g's layout.

    Groups follow the logical channel dim at every sample and spatial position, so NCHW and
    channels_last give the same values. "magnitude" keeps the n largest |g|; "random" keeps n
    positions drawn from `generator` (on the CPU one 64-bit word of it per call keys a counter-based
    hash: ``kernels.draws``); "rescale" is magnitude, then each (sample, channel) plane
    (dim 0 x `dim`, over all other dims) is scaled by sum|g| / (sum|pruned g| + eps) to keep
    its L1 norm. With no such spatial dims (a Linear on (batch, features)) rescale scales each
    sample's row over all its channels instead; for a 1-D g, the whole vector. Every group that
    holds inf or NaN still holds a non-finite value afterwards, so a gradient scaler sees it.
    On CUDA with triton installed a Triton kernel does it (nmsparse.kernels; same values, except
    that "random" draws from the kernel's own stream, seeded by the generator's initial seed).
    "tile24" (2:4 only) keeps what the fused route of 2:4 sparse tensor cores keeps: g as
    (positions, channels) in tiles of 4 x 4, at most 2 per row and per column, greedily by |g|
    (``kernels.reference.tile24_prune_grad``; PyTorch's tile kernel on an sm80+ GPU).
    The unbiased methods (E[out] = g; ``nmsparse.kernels.unbiased``): "random-unbiased" is
    "random" times m / n; "mvue" keeps n per group, entry i with probability
    p_i = min(1, c|g_i|) (sum p_i = n) and the value g_i / p_i (a group with at most n nonzeros
    keeps them unscaled), drawing one uniform per group from `generator`: the least variance of
    any unbiased n-per-group estimator. `generator` may also be a key tensor (0-d int64, as
    ``kernels.draws.step_key`` makes, what an SDGP layer on the CPU passes): the torch path and the CPU
    kernel then draw its ``hashed_uniforms``; the Triton kernels seed their stream with its value.
    """
    check_float_tensor(g, "g")
    n, m = check_sdgp_settings(n, m, method)
    d = check_dim(g, dim)
    check_divisible(g.shape[d], m, f"g's channel dim {dim}", g.shape)
    return _prune(g, n, m, method, d, generator, eps)


def _prune(g, n, m, method, d, generator=None, eps=1e-4):
    """prune_grad for validated arguments (d non-negative): the backward of the SDGP layers, whose settings
    and channel count were checked when they were built. Profiled as ``nn.profiling.GRAD_PRUNE``."""
    with scope(GRAD_PRUNE):
        return _prune_unscoped(g, n, m, method, d, generator, eps)


def _prune_unscoped(g, n, m, method, d, generator, eps):
    if method == "tile24":
        out = ops.tile24_prune_grad(g, d)
        # The tile's greedy choice may drop a NaN; keep non-finite entries so a scaler still sees them.
        return torch.where(torch.isfinite(g), out, g)
    fast = prune_grad_fast(g, n, m, method, d, generator, eps)
    if fast is not None:
        return fast
    return prune_checked(g, n, m, method, d, generator, eps)


def _autocast(*tensors):
    """Tensors cast as autocast would cast a conv/linear's arguments, so the Function sees one dtype."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _check_layer(x, weight, n, m, method, what: str):
    check_float_tensor(x, "x")
    check_float_tensor(weight, "weight")
    n, m = check_sdgp_settings(n, m, method)
    check_divisible(weight.shape[0], m, f"weight's {what} dim 0", weight.shape)
    return n, m


def _save(ctx, x, weight, n, m, method, generator) -> None:
    """Saves x, weight and the pruning settings; a key tensor (a CPU layer's random methods) is saved as a
    tensor, so a compiled graph carries it from forward to backward."""
    key = generator if isinstance(generator, torch.Tensor) else None
    ctx.prune = (n, m, method, None if key is not None else generator)
    ctx.save_for_backward(x, weight, key)


def _saved(ctx):
    """(x, weight, (n, m, method, generator or key)) as _save kept them."""
    x, weight, key = ctx.saved_tensors
    return x, weight, ctx.prune if key is None else ctx.prune[:3] + (key,)


class _SDGPConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, n, m, method, generator):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        _save(ctx, x, weight, n, m, method, generator)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight, prune = _saved(ctx)
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        if need_w or need_b:
            _, dw, db = torch.ops.aten.convolution_backward(
                gy, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
                [False, need_w, need_b])
        if need_x:
            n, m, method, generator = prune
            gp = _prune(gy, n, m, method, 1, generator)
            dx = torch.ops.aten.convolution_backward(
                gp, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False])[0]
        return (dx, dw, db) + (None,) * 8


class _SDGPLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, n, m, method, generator):
        _save(ctx, x, weight, n, m, method, generator)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, prune = _saved(ctx)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dw, db = linear_param_grads(gy, x, need_w, need_b)
        dx = sdgp_linear_input_grad(gy, weight, *prune) if need_x else None
        return (dx, dw, db) + (None,) * 4


def linear_param_grads(gy: torch.Tensor, x: torch.Tensor, need_w: bool, need_b: bool):
    """A Linear's dense weight and bias gradients (None where not needed) from dY and X of any leading shape."""
    g2 = gy.reshape(-1, gy.shape[-1])
    dw = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
    db = g2.sum(0) if need_b else None
    return dw, db


def sdgp_linear_input_grad(gy, weight, n, m, method, generator=None):
    """A Linear's SDGP input gradient (dY pruned n:m along its features) @ W: on 2:4 sparse tensor
    cores where they apply and were measured faster for this shape, else dense."""
    dx = ops.sdgp_linear_dx(gy, weight, n, m, method, generator)
    if dx is None:
        dx = _prune(gy, n, m, method, gy.dim() - 1, generator).matmul(weight)
    return dx


def _resolve_padding(x, weight, stride, padding, dilation):
    """Integer (top, left) padding; 'same' with an odd total first pads x's far side, as torch does."""
    if not isinstance(padding, str):
        return x, _pair(padding)
    if padding == "valid":
        return x, (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding='same' needs stride 1, got stride={tuple(stride)}")
    total = [dl * (k - 1) for dl, k in zip(dilation, weight.shape[2:])]
    if total[0] % 2 or total[1] % 2:
        x = F.pad(x, (0, total[1] % 2, 0, total[0] % 2))
    return x, (total[0] // 2, total[1] // 2)


def sdgp_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, n=2, m=4,
                method="rescale", generator=None):
    """F.conv2d whose backward feeds the N:M-pruned output gradient to the input gradient only."""
    n, m = _check_layer(x, weight, n, m, method, "out-channel")
    return _conv2d(x, weight, bias, _pair(stride), padding, _pair(dilation), groups, n, m, method, generator)


def _conv2d(x, weight, bias, stride, padding, dilation, groups, n, m, method, generator):
    """sdgp_conv2d for validated settings (stride and dilation as pairs); only the input is checked."""
    check_float_tensor(x, "x")
    x, padding = _resolve_padding(x, weight, stride, padding, dilation)
    x, weight, bias = _autocast(x, weight, bias)
    return _SDGPConv2dFn.apply(x, weight, bias, list(stride), list(padding), list(dilation), groups,
                               n, m, method, generator)


def sdgp_linear(x, weight, bias=None, n=2, m=4, method="rescale", generator=None):
    """F.linear whose backward feeds the N:M-pruned output gradient to the input gradient only."""
    n, m = _check_layer(x, weight, n, m, method, "out-feature")
    return _linear(x, weight, bias, n, m, method, generator)


def _linear(x, weight, bias, n, m, method, generator):
    """sdgp_linear for validated settings; only the input is checked."""
    check_float_tensor(x, "x")
    x, weight, bias = _autocast(x, weight, bias)
    return _SDGPLinearFn.apply(x, weight, bias, n, m, method, generator)


def _seeded_generator(layer, device: torch.device) -> torch.Generator:
    """The random methods' generator for the layer's current step on a GPU (the Triton kernels seed their Philox
    stream with its initial seed): one host read, so under torch.compile a graph break (not on the CPU: there a
    traced key, ``kernels.draws.step_key``)."""
    return torch.Generator(device=device).manual_seed((layer.seed * SEED_STRIDE + int(layer.sdgp_step)) % (1 << 64))


_DISABLED: list = []


def _outside_graph():
    """_seeded_generator under torch.compiler.disable (a clean graph break under torch.compile), made when a layer of
    a random method is first built: decorating at import would import torch._dynamo, seconds at every CLI start."""
    if not _DISABLED:
        _DISABLED.append(torch.compiler.disable(_seeded_generator))
    return _DISABLED[0]


class _SDGPMixin:
    """Shared state of the SDGP modules: n, m, method, seed and the persistent `sdgp_step` counter."""

    _dense_cls: type
    _out_name: str

    def _init_sdgp(self, out: int, n, m, method, seed, device) -> None:
        n, m = check_sdgp_settings(n, m, method)
        if out % m:
            raise ValueError(f"{self._dense_cls.__name__} with {self._out_name}={out} cannot be "
                             f"grouped by m={m}: {out} is not divisible by {m}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.n, self.m, self.method, self.seed = n, m, method, seed
        self.register_buffer("sdgp_step", torch.zeros((), dtype=torch.int64, device=device))
        if method in STOCHASTIC_METHODS:
            _outside_graph()  # made in eager code: made while torch.compile traces, it would break the graph again

    def _step_generator(self, *inputs: torch.Tensor | None) -> torch.Generator | torch.Tensor | None:
        """Counts forwards that record a backward; for the random methods, what that backward draws from: on the
        CPU the key tensor of (seed, step) (traced by torch.compile, no graph break), elsewhere a generator."""
        if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
            return None
        with torch.no_grad():
            if self.method in STOCHASTIC_METHODS and inputs[0].device.type == "cpu":
                # the key and the next count from one op: a compiled forward computes (and saves) the key
                key, step = step_key_advance(self.seed, self.sdgp_step)
                self.sdgp_step.copy_(step)
                return key
            gen = _outside_graph()(self, inputs[0].device) if self.method in STOCHASTIC_METHODS else None
            self.sdgp_step.add_(1)
        return gen

    @classmethod
    def from_dense(cls, module: nn.Module, n: int = 2, m: int = 4, method: str = "rescale", seed: int = 0):
        """The SDGP version of `module`, sharing its Parameter objects (state_dict keys and optimizers
        still match) and keeping its device, dtype, padding and padding_mode."""
        if not isinstance(module, cls._dense_cls) or isinstance(module, _SDGPMixin):
            raise TypeError(f"{cls.__name__}.from_dense needs an nn.{cls._dense_cls.__name__}, "
                            f"got {type(module).__name__}")
        if parametrize.is_parametrized(module):
            raise ValueError(f"{cls.__name__}.from_dense: the module has parametrizations; convert it "
                             "to SDGP first, then register them")
        new = cls(**cls._dense_kwargs(module), device="meta", dtype=module.weight.dtype,
                  n=n, m=m, method=method, seed=seed)
        new.weight, new.bias = module.weight, module.bias
        new.sdgp_step = torch.zeros((), dtype=torch.int64, device=module.weight.device)
        return new.train(module.training)

    def to_dense(self) -> nn.Module:
        """A plain nn.Conv2d / nn.Linear holding the same Parameter objects."""
        if parametrize.is_parametrized(self):
            raise ValueError(f"{type(self).__name__}.to_dense: remove the weight parametrizations first")
        dense = self._dense_cls(**self._dense_kwargs(self), device="meta", dtype=self.weight.dtype)
        dense.weight, dense.bias = self.weight, self.bias
        return dense.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sdgp={self.n}:{self.m} {self.method}, seed={self.seed}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # A dense checkpoint has no step counter: load it as is, keeping the current count.
        if prefix + "sdgp_step" in missing_keys:
            missing_keys.remove(prefix + "sdgp_step")


class SDGPConv2d(_SDGPMixin, nn.Conv2d):
    """nn.Conv2d with SDGP: the input gradient uses the output gradient pruned n:m along channels.

    `sdgp_step` counts forwards that record a backward; "random" (and "random-unbiased", "mvue") draws its choice for
    step s from (seed, s): on the CPU from the key ``kernels.draws.step_key(seed, s)``, on a GPU from a generator
    seeded with seed * 1_000_003 + s; so a reloaded model continues identically.
    """

    _dense_cls = nn.Conv2d
    _out_name = "out_channels"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 n: int = 2, m: int = 4, method: str = "rescale", seed: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self._init_sdgp(out_channels, n, m, method, seed, device)

    @staticmethod
    def _dense_kwargs(mod) -> dict:
        return dict(in_channels=mod.in_channels, out_channels=mod.out_channels,
                    kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                    dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None,
                    padding_mode=mod.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # read once: a parametrized weight is recomputed per read
        gen = self._step_generator(x, weight, bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        # The settings were checked when the layer was built; the forward does not check them again.
        return _conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups, self.n, self.m,
                       self.method, gen)


class SDGPLinear(_SDGPMixin, nn.Linear):
    """nn.Linear with SDGP: the input gradient uses the output gradient pruned n:m along features.

    Rescale keeps each sample's L1 norm over tokens (3-D inputs) or over its whole row (2-D).
    `sdgp_step` and the seed work as in SDGPConv2d.
    """

    _dense_cls = nn.Linear
    _out_name = "out_features"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 n: int = 2, m: int = 4, method: str = "rescale", seed: int = 0):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_sdgp(out_features, n, m, method, seed, device)

    @staticmethod
    def _dense_kwargs(mod) -> dict:
        return dict(in_features=mod.in_features, out_features=mod.out_features,
                    bias=mod.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # read once: a parametrized weight is recomputed per read
        gen = self._step_generator(x, weight, bias)
        return _linear(x, weight, bias, self.n, self.m, self.method, gen)
