"""A Linear whose own 2:4 weight runs on 2:4 sparse tensor cores: `sparsify` with WeightNM(kernel="auto").

``SparseCoreLinear`` is an nn.Linear (the same Parameters, state_dict keys and isinstance checks)
that reads its masked weight W*mask from the NMWeightSparsity parametrization registered on
``weight``, as any sparsified Linear does, and runs

- the forward product y = x @ (W*mask)^T through ``kernels.ops.weight24_linear`` (a 2:4 mask);
- the backward-data product dX = dY @ (W*mask) through ``kernels.ops.weight24_linear_dx`` when
  the mask is transposable 2:4 (2:4 along the output features too); a plain 2:4 mask: dense;
- dW = dY^T @ x and db dense (the parametrization's straight-through backward then applies).

Each ops function asks the measuring Dispatcher (``kernels.dispatch``), which times the dense and
the sparse product once per (op, shape, dtype, GPU) and picks sparse only where it was faster;
where sparse cores are absent (CPU, no sm80+ GPU), the dtype is not float16/bfloat16, a size is
not a multiple of 64, or under torch.compile, the layer runs exactly nn.Linear's
F.linear(x, W*mask, b). Without a 2:4 NMWeightSparsity on its weight it is a plain nn.Linear.

``SparseCoreSDGPLinear`` is the same for an SDGPLinear (weight and data-gradient sparsity on one
layer): forward as above; the backward-data product is SDGP's, (N:M-pruned dY) @ W, through
``ops.sdgp_linear_dx`` (pruned dY compressed): SDGP wins, since its pruning defines dX and a
sparse-core product takes one sparse operand. It is an SDGPLinear and a SparseCoreLinear.

``to_sparse_core(module)`` converts (sharing Parameters and buffers); ``squash`` turns both back
into plain nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..kernels import ops
from .sdgp import SDGPLinear, _autocast, _linear, linear_param_grads, sdgp_linear_input_grad
from .weight import NMWeightSparsity, find_parametrization

__all__ = ["KERNELS", "SparseCoreLinear", "SparseCoreSDGPLinear", "to_sparse_core", "sparse_core_eligible",
           "check_kernel"]

# WeightNM.kernel: "dense": masked dense products everywhere; "auto": 2:4 Linears on sparse cores
# where the Dispatcher measured them faster.
KERNELS = ("dense", "auto")


def check_kernel(kernel, n: int, m: int) -> None:
    """ValueError unless `kernel` is one of KERNELS and, for "auto", the pattern is 2:4."""
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"weight.kernel must be 'dense' (masked dense products) or 'auto' (2:4 Linear layers "
                         f"on 2:4 sparse tensor cores where measured faster, dense elsewhere), got {kernel!r}")
    if kernel == "auto" and (n, m) != (2, 4):
        raise ValueError(f"weight.kernel='auto' runs 2:4 weights on 2:4 sparse tensor cores, which take only "
                         f"2:4; got {n}:{m}: use kernel='dense' (the default)")


def sparse_core_eligible(module: nn.Module) -> bool:
    """Whether `module` can become a sparse-core Linear: exactly an nn.Linear or an SDGPLinear (not a
    subclass with its own forward), with both feature counts multiples of 64 (what sparse cores take)."""
    return (type(module) in (nn.Linear, SDGPLinear) and module.in_features % 64 == 0
            and module.out_features % 64 == 0)


class _SparseCoreLinearFn(torch.autograd.Function):
    """F.linear with the forward (and, transposable or SDGP, the backward-data) product offered to
    the sparse cores; the ops functions answer None where dense is used."""

    @staticmethod
    def forward(ctx, x, weight, bias, transposable: bool, sdgp):
        ctx.save_for_backward(x, weight)
        ctx.transposable, ctx.sdgp = transposable, sdgp
        y = ops.weight24_linear(x.detach(), weight.detach())  # inputs keep requires_grad inside forward
        if y is None:
            return F.linear(x, weight, bias)
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = None
        dw, db = linear_param_grads(gy, x, need_w, need_b)
        if need_x:
            if ctx.sdgp is not None:  # SDGP's (pruned dY) @ W, on sparse cores where measured faster
                dx = sdgp_linear_input_grad(gy, weight, *ctx.sdgp)
            else:
                dx = ops.weight24_linear_dx(gy, weight) if ctx.transposable else None
                if dx is None:
                    dx = gy.matmul(weight)
        return dx, dw, db, None, None


class SparseCoreLinear(nn.Linear):
    """nn.Linear whose 2:4 masked weight (NMWeightSparsity on `weight`) runs on 2:4 sparse tensor
    cores where the Dispatcher measured that faster; see the module docstring."""

    def _weight24(self) -> tuple[bool, bool]:
        """(the weight parametrization is 2:4 N:M, it is transposable)."""
        p = find_parametrization(self, "weight")
        if isinstance(p, NMWeightSparsity) and (p.n, p.m) == (2, 4):
            return True, p.transposable
        return False, False

    def _offer(self, x, weight, bias):
        """(x, weight, bias) as autocast would cast them, and whether sparse cores may take them."""
        is24, transposable = self._weight24()
        if not is24 or torch.compiler.is_compiling():
            return None, transposable
        cast = _autocast(x, weight, bias)
        return (cast if ops.weight24_applies(cast[0], cast[1]) else None), transposable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # read once: a parametrized weight is recomputed per read
        cast, transposable = self._offer(x, weight, bias)
        if cast is None:
            return F.linear(x, weight, bias)
        return _SparseCoreLinearFn.apply(*cast, transposable, None)

    @classmethod
    def from_dense(cls, module: nn.Linear) -> "SparseCoreLinear":
        """The sparse-core version of an nn.Linear, holding the same Parameter objects."""
        if type(module) is not nn.Linear:
            raise TypeError(f"SparseCoreLinear.from_dense needs an nn.Linear, got {type(module).__name__}")
        if parametrize.is_parametrized(module):
            raise ValueError("SparseCoreLinear.from_dense: the module has parametrizations; convert it first, "
                             "then register them")
        new = cls(module.in_features, module.out_features, module.bias is not None, device="meta",
                  dtype=module.weight.dtype)
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear holding the same Parameter objects (remove the parametrizations first)."""
        if parametrize.is_parametrized(self):
            raise ValueError(f"{type(self).__name__}.to_dense: remove the weight parametrizations first")
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta",
                          dtype=self.weight.dtype)
        dense.weight, dense.bias = self.weight, self.bias
        return dense.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel=auto"


class SparseCoreSDGPLinear(SDGPLinear, SparseCoreLinear):
    """SDGPLinear whose forward runs as SparseCoreLinear's; the backward-data product stays SDGP's
    (its pruned dY on sparse cores where measured faster). to_dense gives an nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # read once: a parametrized weight is recomputed per read
        gen = self._step_generator(x, weight, bias)
        cast, _ = self._offer(x, weight, bias)
        # n, m and the method were checked when the layer was built: the forward does not check them again.
        if cast is None:
            return _linear(x, weight, bias, self.n, self.m, self.method, gen)
        return _SparseCoreLinearFn.apply(*cast, False, (self.n, self.m, self.method, gen))

    @classmethod
    def from_sdgp(cls, module: SDGPLinear) -> "SparseCoreSDGPLinear":
        """The sparse-core version of an SDGPLinear, holding the same Parameters and step counter."""
        if type(module) is not SDGPLinear:
            raise TypeError(f"SparseCoreSDGPLinear.from_sdgp needs an SDGPLinear, got {type(module).__name__}")
        if parametrize.is_parametrized(module):
            raise ValueError("SparseCoreSDGPLinear.from_sdgp: the module has parametrizations; convert it "
                             "first, then register them")
        new = cls(module.in_features, module.out_features, module.bias is not None, device="meta",
                  dtype=module.weight.dtype, n=module.n, m=module.m, method=module.method, seed=module.seed)
        new.weight, new.bias = module.weight, module.bias
        new.sdgp_step = module.sdgp_step
        return new.train(module.training)

    def to_dense(self) -> nn.Linear:
        return SDGPLinear.to_dense(self)


def to_sparse_core(module: nn.Module) -> SparseCoreLinear:
    """The sparse-core version of an nn.Linear or SDGPLinear (sharing its Parameters); a
    SparseCoreLinear is returned as is."""
    if isinstance(module, SparseCoreLinear):
        return module
    if type(module) is SDGPLinear:
        return SparseCoreSDGPLinear.from_sdgp(module)
    return SparseCoreLinear.from_dense(module)
