"""Argument checks shared by the pattern functions: every error names the argument and value."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype} with shape {tuple(x.shape)}"
        )
    return x


def check_nm(n, m) -> tuple[int, int]:
    for arg, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{arg} must be an int, got {v!r}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got m={m}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got n={n}")
    if n > m:
        raise ValueError(f"n must be <= m, got n={n} > m={m}")
    return n, m


def check_dim(x: torch.Tensor, dim, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {dim!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a scalar tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{name}={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def check_divisible(size: int, m: int, what: str, shape) -> None:
    if size % m != 0:
        raise ValueError(
            f"{what} has size {size} in shape {tuple(shape)}, which is not divisible by m={m}; "
            f"pad it to a multiple of {m} or choose an m that divides {size}"
        )


def check_2d(w: torch.Tensor, name: str = "w") -> None:
    if w.dim() != 2:
        hint = " (for a conv weight use nmsparse.conv_to_2d first)" if w.dim() == 4 else ""
        raise ValueError(f"{name} must be 2-D, got shape {tuple(w.shape)}{hint}")


def check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)
