"""SDGP for transformers' Conv1D (GPT-2's layers, weight stored (in, out)): the SDGPLinear product with W^T.

Kept apart from ``nn.sdgp`` so that file stays one screen per idea; ``SDGP_LAYERS`` lists every SDGP layer type.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import is_hf_conv1d
from .sdgp import SDGPConv2d, SDGPLinear, _linear, _SDGPMixin


class SDGPConv1D(_SDGPMixin, nn.Module):
    """transformers' Conv1D (GPT-2: y = x @ W + b, W stored (in, out)) with SDGP: the product with W^T of
    SDGPLinear, the input gradient using the output gradient pruned n:m along features.

    Holds the Conv1D's Parameters (same state_dict keys); ``to_dense`` gives a Conv1D of the same class
    back. Built only by ``from_dense`` (transformers is never imported here).
    """

    nmsparse_weight_in_out = True  # nn.layers: the weight is stored (in, out)
    _out_name = "nf"

    def __init__(self, nf: int, nx: int, dense_cls: type, device=None, dtype=None, *,
                 n: int = 2, m: int = 4, method: str = "rescale", seed: int = 0):
        super().__init__()
        self.nf, self.nx, self._dense_cls = nf, nx, dense_cls
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        self._init_sdgp(nf, n, m, method, seed, device)

    @classmethod
    def from_dense(cls, module: nn.Module, n: int = 2, m: int = 4, method: str = "rescale", seed: int = 0):
        """The SDGP version of a transformers Conv1D, sharing its Parameter objects."""
        if not is_hf_conv1d(module) or isinstance(module, _SDGPMixin):
            raise TypeError(f"SDGPConv1D.from_dense needs a transformers Conv1D, got {type(module).__name__}")
        if parametrize.is_parametrized(module):
            raise ValueError("SDGPConv1D.from_dense: the module has parametrizations; convert it to SDGP first, "
                             "then register them")
        nx, nf = module.weight.shape
        new = cls(nf, nx, type(module), device="meta", dtype=module.weight.dtype, n=n, m=m, method=method, seed=seed)
        new.weight, new.bias = module.weight, module.bias
        new.sdgp_step = torch.zeros((), dtype=torch.int64, device=module.weight.device)
        return new.train(module.training)

    def to_dense(self) -> nn.Module:
        """The Conv1D this layer came from (its class), holding the same Parameter objects."""
        if parametrize.is_parametrized(self):
            raise ValueError("SDGPConv1D.to_dense: remove the weight parametrizations first")
        with torch.device("meta"):
            dense = self._dense_cls(self.nf, self.nx)
        dense.weight, dense.bias = self.weight, self.bias
        return dense.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # read once: a parametrized weight is recomputed per read
        gen = self._step_generator(x, weight, bias)
        return _linear(x, weight.t(), bias, self.n, self.m, self.method, gen)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, sdgp={self.n}:{self.m} {self.method}, seed={self.seed}"


SDGP_LAYERS = (SDGPConv2d, SDGPLinear, SDGPConv1D)
