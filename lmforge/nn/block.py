"""Transformer layers: attention + MLP, each in a residual branch, norms pre or post; and the
decoder layer of an encoder-decoder, which adds cross-attention between the two.

Pre-norm (GPT-2 and later):  x = x + Attn(LN1(x));  x = x + MLP(LN2(x))
Post-norm (Vaswani et al. 2017, BERT): x = LN1(x + Attn(x));  x = LN2(x + MLP(x))
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.nn.attention import CrossAttention, KVCache, SelfAttention
from lmforge.nn.config import TransformerConfig
from lmforge.nn.mlp import MLP
from lmforge.nn.norms import make_norm


class Block(nn.Module):
    """`attn_scale` (None: 1/sqrt(head_dim)) and `mlp_hidden_dropout` are T5's departures; GPT
    and BERT leave them at their defaults."""

    def __init__(self, config: TransformerConfig, *, attn_scale: float | None = None, mlp_hidden_dropout: float = 0.0):
        super().__init__()
        c = config
        self.pre_norm = c.norm_position == "pre"
        self.ln_1 = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.attn = SelfAttention(c.n_embd, c.n_head, c.n_kv_head, c.bias, c.dropout, c.head_dim, attn_scale)
        self.ln_2 = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.mlp = MLP(c.n_embd, c.mlp_hidden, c.activation, c.bias, c.dropout, mlp_hidden_dropout)

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
        attn_kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, rope=rope, kv_cache=kv_cache, layer_idx=layer_idx)
        if self.pre_norm:
            x = x + self.attn(self.ln_1(x), **attn_kwargs)
            x = x + self.mlp(self.ln_2(x))
        else:
            x = self.ln_1(x + self.attn(x, **attn_kwargs))
            x = self.ln_2(x + self.mlp(x))
        return x


class DecoderBlock(Block):
    """A `Block` with cross-attention to the encoder output between self-attention and the MLP
    (Vaswani et al. 2017, figure 1), in its own residual branch with its own norm `ln_cross`:

    pre-norm:  x = x + Attn(LN1(x));  x = x + Cross(LNc(x), enc);  x = x + MLP(LN2(x))
    post-norm: x = LN1(x + Attn(x));  x = LNc(x + Cross(x, enc));  x = LN2(x + MLP(x))
    """

    def __init__(self, config: TransformerConfig, *, attn_scale: float | None = None, mlp_hidden_dropout: float = 0.0):
        super().__init__(config, attn_scale=attn_scale, mlp_hidden_dropout=mlp_hidden_dropout)
        c = config
        self.ln_cross = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.cross_attn = CrossAttention(c.n_embd, c.n_head, c.n_kv_head, c.bias, c.dropout, c.head_dim, attn_scale)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # (B, T, C) decoder states
        cross_kv: tuple[torch.Tensor, torch.Tensor],  # this layer's encoder keys/values (CrossKV)
        *,
        attn_mask: torch.Tensor | None = None,  # decoder self-attention: bool, or float with a bias
        is_causal: bool = False,
        cross_mask: torch.Tensor | None = None,  # (B, 1, 1, S) True for source tokens
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        attn_kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, kv_cache=kv_cache, layer_idx=layer_idx)
        if self.pre_norm:
            x = x + self.attn(self.ln_1(x), **attn_kwargs)
            x = x + self.cross_attn(self.ln_cross(x), cross_kv, attn_mask=cross_mask)
            x = x + self.mlp(self.ln_2(x))
        else:
            x = self.ln_1(x + self.attn(x, **attn_kwargs))
            x = self.ln_cross(x + self.cross_attn(x, cross_kv, attn_mask=cross_mask))
            x = self.ln_2(x + self.mlp(x))
        return x
