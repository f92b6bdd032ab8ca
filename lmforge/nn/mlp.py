"""Position-wise feed-forward network: Linear -> activation -> Linear, or gated (SwiGLU, GeGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`c_fc`/`c_proj` follow GPT-2's names so checkpoints convert with transposes only.

    For the gated variants (Shazeer 2020) `c_fc` holds the gate and the up projection stacked,
    one matmul instead of two: out = c_proj(act(gate) * up), with act = SiLU (SwiGLU) or GELU's
    tanh approximation (GeGLU; T5 v1.1's "gated-gelu").

    `hidden_dropout` drops the activations before `c_proj` as T5 does; GPT and BERT leave it at
    0, and then there is no extra op at all.
    """

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool, dropout: float, hidden_dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        gated = activation in ("swiglu", "geglu")
        self.c_fc = nn.Linear(dim, 2 * hidden if gated else hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.hidden_dropout = nn.Dropout(hidden_dropout) if hidden_dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "geglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * up
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h)
        if self.hidden_dropout is not None:
            h = self.hidden_dropout(h)
        return self.dropout(self.c_proj(h))
