"""Position information: learned tables, fixed sinusoids (Vaswani et al., 2017) and rotary
embeddings (RoFormer, Su et al., 2021).

Learned and sinusoidal positions are added to the token embeddings; rotary positions rotate the
queries and keys inside attention, so they are passed to attention as a (cos, sin) pair.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...): shape (n_positions, dim)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal table looked up by position id; a buffer, not a parameter."""

    def __init__(self, n_positions: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_positions, dim), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


class Rotary(nn.Module):
    """Precomputed cos/sin for rotary embeddings in the 'rotate half' layout used by GPT-NeoX/Llama."""

    def __init__(self, n_positions: int, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (n_positions, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B|1, T) -> (B|1, 1, T, head_dim), broadcast over heads
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by their positions' angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
