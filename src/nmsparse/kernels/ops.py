"""Entry points for nn/: the fastest available implementation, same results as the reference.

- ``prune_grad_fast``: SDGP gradient pruning by the Triton kernel where ``use_triton`` says so,
  by the compiled one-pass CPU kernel (``native_prune``) on CPU tensors, else None (the caller
  keeps its torch implementation).
- ``tile24_prune_grad``: the "tile24" SDGP pattern: on a GPU by PyTorch's tile kernel, on a CPU
  by the reference emulation.
- ``sdgp_linear_dx``: a Linear's SDGP input gradient on 2:4 sparse tensor cores, where that
  applies and the Dispatcher measured it faster for this shape; else None (dense in the caller).
- ``weight24_linear`` / ``weight24_linear_dx``: a Linear's forward product with its 2:4 weight,
  and its backward-data product with a transposable 2:4 weight, on 2:4 sparse tensor cores where
  that applies and the Dispatcher measured it faster; else None (dense in the caller).
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from .dispatch import Dispatcher, default_dispatcher, use_triton
from .native_prune import kernel_takes, prune_grad_native, prune_grad_op
from .semi_structured import SPARSE_DTYPES, is_available

__all__ = ["prune_grad_fast", "tile24_prune_grad", "sdgp_linear_dx", "sparse24_applies",
           "weight24_applies", "weight24_linear", "weight24_linear_dx", "triton_failure"]

_triton_failure: str | None = None
# The methods the Triton kernel computes (all but tile24, which has PyTorch's own kernel).
TRITON_METHODS = reference.PRUNE_METHODS


def triton_failure() -> str | None:
    """Why the Triton kernels were switched off for this process (a first call that failed), or None."""
    return _triton_failure


def _guarded(fn):
    """fn()'s result, or None (with a one-time warning, and no more Triton in this process) if the
    kernels fail, e.g. a Triton that cannot compile for this GPU: training goes on in torch."""
    global _triton_failure
    if _triton_failure is not None:
        return None
    try:
        return fn()
    except Exception as e:
        _triton_failure = f"{type(e).__name__}: {e}"
        warnings.warn(f"nmsparse: the Triton pruning kernels failed ({_triton_failure}); using the torch "
                      "implementation for the rest of this process", RuntimeWarning, stacklevel=3)
        return None


def prune_grad_fast(g: torch.Tensor, n: int, m: int, method: str, dim: int,
                    generator: torch.Generator | torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor | None:
    """The Triton version of SDGP's prune_grad for g (on a CPU tensor the compiled CPU kernel's, same values as
    the torch path), or None where neither applies (an unsupported dtype or m, triton missing or disabled, no
    C++ build, autograd through g, torch.compile). Under torch.compile a CPU magnitude or rescale prune is the
    opaque op ``nmsparse::prune_grad_cpu`` (the C++ kernel when the graph runs), and so is a random method's prune
    from a key tensor (what a CPU layer passes; any m).

    "random" draws from the kernel's Philox stream seeded by ``generator.initial_seed()`` (or a key
    tensor's value): reproducible from the layer's (seed, step), but not the same choice as torch's stream.
    """
    if torch.compiler.is_compiling() and n < m:  # the opaque op: the C++ kernel (or the torch path) at run time
        key = generator if isinstance(generator, torch.Tensor) else None
        if method in ("magnitude", "rescale"):
            takes = kernel_takes(g, m)
        else:  # a random method from a key: any m (the op runs the torch path where the kernel does not apply)
            takes = key is not None and g.device.type == "cpu" and not g.requires_grad
        if takes:
            return prune_grad_op(g, key, n, m, method, dim, eps)
    if method not in TRITON_METHODS or g.requires_grad or torch.compiler.is_compiling():
        return None
    if g.device.type == "cpu":
        return prune_grad_native(g, n, m, method, dim, generator, eps)
    if _triton_failure is not None or not use_triton(g, m):
        return None
    from .triton_prune import prune, seed_from_generator

    seed = seed_from_generator(generator) if method in reference.STOCHASTIC_METHODS else 0
    return _guarded(lambda: prune(g, n, m, method, dim, seed=seed, eps=eps))


def _tile_ok(g2: torch.Tensor) -> bool:
    return (g2.device.type == "cuda" and g2.dtype in SPARSE_DTYPES and g2.shape[1] % 32 == 0
            and is_available(g2.device))


def tile24_prune_grad(g: torch.Tensor, dim: int = -1,
                      algorithm: str = "largest_abs_values_greedy") -> torch.Tensor:
    """g pruned to the "tile24" pattern (see ``reference.tile24_prune_grad``), dense, g's layout.

    On an sm80+ GPU with a float16/bfloat16 g whose channel count is a multiple of 32, PyTorch's
    tile kernel computes it; otherwise the CPU emulation (moving g to the CPU and back).
    """
    d = dim % g.dim()
    gc = g.movedim(d, -1)
    g2 = gc.reshape(-1, gc.shape[-1])
    if _tile_ok(g2):
        from .semi_structured import apply_tile_masks_dense, tile24_raw

        masks = tile24_raw(g2, algorithm)[4]
        out = apply_tile_masks_dense(g2.contiguous(), masks).view(gc.shape).movedim(-1, d)
        return out if out.stride() == g.stride() else torch.empty_like(g).copy_(out)
    return reference.tile24_prune_grad(g, dim, algorithm)


def sparse24_applies(gy: torch.Tensor, weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether sdgp_linear_dx could use the sparse cores for this gradient and weight at all."""
    return ((n, m) == (2, 4) and gy.device.type == "cuda" and gy.dtype in SPARSE_DTYPES
            and weight.dtype == gy.dtype and gy.shape[-1] % 64 == 0 and weight.shape[1] % 64 == 0
            and gy.numel() // gy.shape[-1] % 64 == 0 and is_available(gy.device))


def sdgp_linear_dx(gy: torch.Tensor, weight: torch.Tensor, n: int, m: int, method: str,
                   generator: torch.Generator | None = None, eps: float = 1e-4,
                   dispatcher: Dispatcher | None = None, backend: str = "auto") -> torch.Tensor | None:
    """dX = (SDGP-pruned dY) @ W on 2:4 sparse tensor cores, or None for the caller's dense path.

    Applies to 2:4, float16/bfloat16 CUDA tensors with sizes the backends take; the first call
    for a (method, shape, dtype, GPU) measures the dense route (same pruning, dense GEMM)
    against the sparse one through the Dispatcher and the answer is cached: None is returned
    where dense measured faster (or the sparse route failed or disagreed), and the Dispatcher's
    log and report() say so. method "tile24" uses the fused prune-and-compress kernel; the
    others prune with the Triton kernel (needs triton) and compress.
    """
    if not sparse24_applies(gy, weight, n, m) or gy.requires_grad or torch.compiler.is_compiling():
        return None
    from . import semi_structured as ss

    if method == "tile24" and not ss.fused_tile_runs(gy.device):  # sm8x only: dense, without a failed trial
        return None
    lead = gy.shape[:-1]
    g2 = gy.reshape(-1, gy.shape[-1])
    if method == "tile24":
        def dense_fn():
            return tile24_prune_grad(g2) @ weight

        def sparse_fn():
            return ss.sdgp_dx_tile24(g2, weight)
    else:
        if method not in TRITON_METHODS or not use_triton(gy, m):
            return None
        from .triton_prune import prune, seed_from_generator

        seed = seed_from_generator(generator) if method in reference.STOCHASTIC_METHODS else 0

        def dense_fn():
            return prune(gy, n, m, method, -1, seed=seed, eps=eps).reshape(g2.shape) @ weight

        def sparse_fn():
            pruned = prune(gy, n, m, method, -1, seed=seed, eps=eps).reshape(g2.shape)
            return ss.to_sparse_24(pruned, backend) @ weight
    disp = dispatcher if dispatcher is not None else default_dispatcher()
    shape = (g2.shape[0], g2.shape[1], weight.shape[1])
    if disp.choose(f"sdgp_dx_{method}", shape, gy.dtype, gy.device, dense_fn, sparse_fn) != "sparse":
        return None
    return sparse_fn().view(*lead, weight.shape[1])


def weight24_applies(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a (..., k) @ W^T with a 2-D W of shape (n, k) could run on the sparse cores at all:
    float16/bfloat16 CUDA tensors of one dtype, k and n multiples of 64, an sm80+ GPU. W is the
    compressed operand; the rows of `a` may be any number (PyTorch pads the dense operand), and a
    shape that a backend still refuses makes the Dispatcher answer dense. (The caller knows
    whether W is 2:4.)"""
    return (a.device.type == "cuda" and a.dtype in SPARSE_DTYPES and weight.dtype == a.dtype
            and weight.dim() == 2 and a.shape[-1] == weight.shape[1] and a.shape[-1] % 64 == 0
            and weight.shape[0] % 64 == 0 and a.numel() > 0 and is_available(a.device))


def _weight24_product(op: str, a: torch.Tensor, wt: torch.Tensor, dispatcher: Dispatcher | None,
                      backend: str) -> torch.Tensor | None:
    """a @ wt^T with wt (a view of) a 2:4-along-dim-1 matrix, compressed at each call (the weights
    change at every step), on sparse cores where the Dispatcher measured it faster for this
    (op, shape, dtype, GPU); else None."""
    if not weight24_applies(a, wt) or a.requires_grad or torch.compiler.is_compiling():
        return None
    import torch.nn.functional as F

    from . import semi_structured as ss

    a2 = a.reshape(-1, a.shape[-1])
    wt = wt.detach()

    def dense_fn():
        return F.linear(a2, wt)

    def sparse_fn():  # both operands contiguous (a gradient may come expanded or strided)
        return F.linear(a2.contiguous(), ss.to_sparse_24(wt.contiguous(), backend))

    disp = dispatcher if dispatcher is not None else default_dispatcher()
    shape = (a2.shape[0], a2.shape[1], wt.shape[0])
    if disp.choose(op, shape, a.dtype, a.device, dense_fn, sparse_fn) != "sparse":
        return None
    return sparse_fn().reshape(*a.shape[:-1], wt.shape[0])


def weight24_linear(x: torch.Tensor, weight: torch.Tensor, dispatcher: Dispatcher | None = None,
                    backend: str = "auto") -> torch.Tensor | None:
    """y = x @ W^T (no bias) with W (out, in) already masked 2:4 along its input features, W
    compressed and the product run on 2:4 sparse tensor cores; or None for the caller's dense
    F.linear: where the sparse cores do not apply (``weight24_applies``), or where the Dispatcher
    measured dense faster for this shape (or the sparse route failed or disagreed)."""
    return _weight24_product("w24_linear", x, weight, dispatcher, backend)


def weight24_linear_dx(gy: torch.Tensor, weight: torch.Tensor, dispatcher: Dispatcher | None = None,
                       backend: str = "auto") -> torch.Tensor | None:
    """dX = dY @ W for a Linear whose W (out, in) is masked to a transposable 2:4 pattern (2:4 along
    its output features too): W^T compressed and the product run on 2:4 sparse tensor cores; or
    None for the caller's dense product (same rules as ``weight24_linear``). dY: (..., out)."""
    if weight.dim() != 2:
        return None
    return _weight24_product("w24t_linear_dx", gy, weight.t(), dispatcher, backend)
