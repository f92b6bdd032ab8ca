"""Multi-head self-attention (with grouped-query option), cross-attention, their caches and masks.

All attention goes through `torch.nn.functional.scaled_dot_product_attention`, which picks a
fused kernel (flash / memory-efficient / CPU flash) when the inputs allow it. The fast path is
`is_causal=True` with no explicit mask (training, and prefill without padding); padding and
cached decoding use a boolean mask built once per forward by `attention_mask_for`. A float
`attn_mask` is added to the scores instead: T5's relative position bias travels that way, with
the padding already folded in (`RelativePositionBias`), so attention itself needs no extra input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.positions import apply_rotary


class KVCache:
    """Pre-allocated keys/values for incremental decoding: one (B, H_kv, max_len, D) slab per layer.

    Writing in place into a fixed buffer avoids the re-allocation that concatenating every step
    costs. All sequences of a batch share one write position `pos`; prompts of different lengths
    are left-padded so they all end at the same position.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H_kv, T, D) keys/values and return all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def truncate(self, pos: int) -> None:
        """Forget the positions from `pos` on (speculative decoding drops the rejected draft
        tokens); their slots are overwritten by the next writes."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate a KV cache of {self.pos} positions to {pos}")
        self.pos = pos

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders hypotheses between steps)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


def attention_mask_for(
    n_new: int, n_past: int, key_padding: torch.Tensor | None, causal: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, n_new, n_past + n_new); True where a query may attend to a key.

    Returns None when SDPA can do without one (`is_causal` covers the plain causal case, and a
    single new token with no padding may attend to everything before it). The mask is built on
    `key_padding`'s device, else on `device` (the model's: a CPU mask fails on CUDA).
    """
    if key_padding is None:
        if not causal or n_new == 1:
            return None
        if n_past == 0:
            return None  # caller passes is_causal=True
    if key_padding is not None:
        device = key_padding.device
    q = torch.arange(n_past, n_past + n_new, device=device)[:, None]
    k = torch.arange(n_past + n_new, device=device)[None, :]
    allowed = (k <= q) if causal else torch.ones(n_new, n_past + n_new, dtype=torch.bool, device=device)
    if key_padding is None:
        return allowed[None, None]
    allowed = allowed[None] & key_padding[:, None, :].bool()
    # A padding query (left padding) would otherwise see no key at all, and softmax over nothing
    # is NaN, which leaks through 0 * NaN into real positions. Letting it see itself is harmless.
    allowed = allowed | (k == q)[None]
    return allowed[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (`c_attn`) and output `c_proj`.

    With n_kv_head < n_head, groups of query heads share one key/value head (GQA, Ainslie et al.
    2023); `c_attn` then produces n_head + 2*n_kv_head heads. `head_dim` defaults to
    dim // n_head (T5 sets it apart); `scale` multiplies the scores, default 1/sqrt(head_dim)
    (T5 uses 1.0, having folded the scale into its initialisation).
    """

    def __init__(
        self, dim: int, n_head: int, n_kv_head: int, bias: bool, dropout: float,
        head_dim: int | None = None, scale: float | None = None,
    ):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim or dim // n_head
        self.c_attn = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_head * self.head_dim, dim, bias=bias)
        self.dropout = dropout
        self.scale = scale
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        hd = self.head_dim
        q, k, v = self.c_attn(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=2)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, H, T, D), (B, H_kv, T, D) x2
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        return self._attend(q, k, v, attn_mask, is_causal)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, n*D) -> (B, n, T, D)"""
        B, T, _ = t.shape
        return t.view(B, T, -1, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """Attention over (B, H, T, D) queries and (B, H_kv, S, D) keys/values, then `c_proj`."""
        B, _, T, _ = q.shape
        y = _sdpa(q, k, v, attn_mask, self.dropout if self.training else 0.0, is_causal and attn_mask is None,
                  self.n_kv_head != self.n_head, self.scale)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class CrossAttention(SelfAttention):
    """Attention from the decoder (queries) to the encoder output (keys/values), Vaswani et al. 2017.

    The parameters are self-attention's: `c_attn` stacks the query, key and value projections,
    here applied to different inputs: its query rows to the decoder states, its key/value rows to
    the encoder output. Keys/values depend on the source alone, so a decoder computes them once
    per source (`project_kv`, kept in a `CrossKV`) and reuses them at every decoding step.
    """

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, S, C) -> keys and values, each (B, H_kv, S, D)."""
        n_q = self.n_head * self.head_dim
        w, b = self.c_attn.weight, self.c_attn.bias
        k, v = F.linear(memory, w[n_q:], None if b is None else b[n_q:]).chunk(2, dim=2)
        return self._heads(k), self._heads(v)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # (B, T, C) decoder states
        kv: tuple[torch.Tensor, torch.Tensor],  # from `project_kv`
        *,
        attn_mask: torch.Tensor | None = None,  # (B, 1, 1, S) True for source tokens
    ) -> torch.Tensor:
        n_q = self.n_head * self.head_dim
        w, b = self.c_attn.weight, self.c_attn.bias
        q = F.linear(x, w[:n_q], None if b is None else b[:n_q])
        return self._attend(self._heads(q), *kv, attn_mask, is_causal=False)


class CrossKV:
    """Each decoder layer's cross-attention keys/values of one source batch: computed once by
    the model's `cross_kv`, read at every decoding step."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv  # per decoder layer: (B, H_kv, S, D) keys and values

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders hypotheses between steps)."""
        self.kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv]


def _sdpa(q, k, v, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool, scale: float | None = None) -> torch.Tensor:
    """`scaled_dot_product_attention`, in fp32 under CPU autocast.

    PyTorch's CPU flash-attention kernel is about 4x slower in bf16 than in fp32 at small head
    sizes (measured on a Zen4 CPU, head size 32), while the matmuls around it gain from bf16; so
    on CPU attention itself runs in fp32 and only the projections use bf16.
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, enable_gqa=enable_gqa, scale=scale,
            )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=enable_gqa, scale=scale
    )
