"""Position information: learned tables, fixed sinusoids (Vaswani et al., 2017), rotary
embeddings (RoFormer, Su et al., 2021) and T5's relative position bias (Raffel et al., 2020).

Learned and sinusoidal positions are added to the token embeddings; rotary positions rotate the
queries and keys inside attention, so they are passed to attention as a (cos, sin) pair; the
relative bias is added to the attention scores, so it is passed as a float attention mask.
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


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket index in [0, n_buckets) of each key - query offset, as T5 (Mesh TensorFlow) computes it.

    Bidirectional attention (the encoder) gives half the buckets to keys after the query and half
    to keys before it; unidirectional (the causal decoder) sees only keys before it, so every
    later offset shares bucket 0. Within a direction, the first half of the buckets hold exact
    distances 0, 1, 2, ...; the rest cover distances up to `max_distance` in logarithmically
    wider bins, and everything farther shares the last bucket.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        n_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * n_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    n_exact = n_buckets // 2
    # log-spaced bins; float32 and this order of operations reproduce T5's buckets exactly.
    # (distance < n_exact takes the exact branch, so clamping only avoids log(0) there)
    log_ratio = torch.log(distance.clamp(min=n_exact).float() / n_exact) / math.log(max_distance / n_exact)
    far = (n_exact + (log_ratio * (n_buckets - n_exact)).long()).clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < n_exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's learned scalar per (bucket of key - query offset, head), added to the attention scores.

    One table per stack, computed once per forward and shared by every layer (as in T5, where
    layer 0 holds it). `forward` returns it as SDPA's float attention mask, with the positions a
    query may not see (padding, the future) set to the dtype's minimum.
    """

    def __init__(self, n_head: int, n_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.table = nn.Embedding(n_buckets, n_head)
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional

    def forward(
        self,
        n_query: int,
        n_key: int,
        past: int = 0,  # positions already in the KV cache: the queries are past .. past + n_query - 1
        allowed: torch.Tensor | None = None,  # bool, broadcastable to (B, H, n_query, n_key); None: all
    ) -> torch.Tensor:
        device = self.table.weight.device
        query = torch.arange(past, past + n_query, device=device)[:, None]
        key = torch.arange(n_key, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.n_buckets, self.max_distance)
        bias = self.table(buckets).permute(2, 0, 1)[None]  # (1, H, n_query, n_key)
        if allowed is None:
            return bias
        return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)
