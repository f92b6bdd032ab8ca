"""One Transformer layer: attention + MLP, each in a residual branch, norms pre or post.

Pre-norm (GPT-2 and later):  x = x + Attn(LN1(x));  x = x + MLP(LN2(x))
Post-norm (Vaswani et al. 2017, BERT): x = LN1(x + Attn(x));  x = LN2(x + MLP(x))
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.nn.attention import KVCache, SelfAttention
from lmforge.nn.config import TransformerConfig
from lmforge.nn.mlp import MLP
from lmforge.nn.norms import make_norm


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.pre_norm = c.norm_position == "pre"
        self.ln_1 = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.attn = SelfAttention(c.n_embd, c.n_head, c.n_kv_head, c.bias, c.dropout)
        self.ln_2 = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.mlp = MLP(c.n_embd, c.mlp_hidden, c.activation, c.bias, c.dropout)

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
