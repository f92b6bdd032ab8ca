"""Position-wise feed-forward network: Linear -> activation -> Linear, or gated (SwiGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`c_fc`/`c_proj` follow GPT-2's names so checkpoints convert with transposes only.

    For SwiGLU (Shazeer, 2020) `c_fc` holds the gate and the up projection stacked, one matmul
    instead of two: out = c_proj(silu(gate) * up).
    """

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool, dropout: float):
        super().__init__()
        self.activation = activation
        gated = activation == "swiglu"
        self.c_fc = nn.Linear(dim, 2 * hidden if gated else hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))
