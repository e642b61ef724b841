"""One pre-norm transformer MLP block: x + fc2(gelu(fc1(layernorm(x)))), a ViT's MLP as a unit
(``nmsparse bench gpu`` times it dense and sparsified)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

__all__ = ["MLPBlock"]


class MLPBlock(nn.Module):
    """LayerNorm(dim), Linear(dim, hidden), GELU, Linear(hidden, dim), plus the residual."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))
