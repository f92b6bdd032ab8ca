"""Decoder-only Transformer language model (GPT).

Choices, all set by `GPTConfig`:
- norms: LayerNorm or RMSNorm, pre-norm (GPT-2, default) or post-norm (GPT-1); a final norm
  `ln_f` only with pre-norm, since post-norm layers already end normalised;
- positions: learned table `wpe` (GPT-2), fixed sinusoids, or rotary inside attention;
- attention: causal, multi-head or grouped-query, through `scaled_dot_product_attention`;
- MLP: GELU (exact or GPT-2's tanh approximation), ReLU, or SwiGLU;
- the output projection `lm_head` tied to the token embedding `wte` by default (Press & Wolf 2017).

Module names follow GPT-2 (`transformer.h.0.attn.c_attn`, ...) so that converting to and from
Hugging Face checkpoints is a matter of transposes (see `lmforge.interop.hf_gpt2`).
The model knows nothing of training or decoding: `lmforge.train` and `lmforge.generate` wrap it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import check
from lmforge.nn import Block, KVCache, Rotary, SinusoidalPositions, attention_mask_for, make_norm
from lmforge.nn.config import TransformerConfig


@dataclass
class GPTConfig(TransformerConfig):
    vocab_size: int = 50304
    block_size: int = 256  # the context: the most positions the model attends over
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}")
        check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")

    def flops_per_token(self, n_params: int) -> int:
        """Training FLOPs per token, 6N + 12*L*d*T (PaLM appendix B; Kaplan et al. 2020), d the
        attention width n_head * head_dim (n_embd unless heads were pruned)."""
        return 6 * n_params + 12 * self.n_layer * self.n_head * self.head_dim * self.block_size


# Presets are data: names users can pass to `--preset`. The vocabulary comes from the tokenizer.
GPT_PRESETS: dict[str, dict] = {
    # nanoGPT's CPU "baby GPT": trains in minutes on a laptop
    "gpt-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    # nanoGPT's Shakespeare char model
    "gpt-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    # GPT-2 sizes
    "gpt-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, activation="gelu_tanh"),
    "gpt-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, activation="gelu_tanh"),
    # a modern small decoder: RMSNorm, rotary, SwiGLU, GQA, no biases (Llama-style)
    "gpt-tiny-modern": dict(
        n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, norm="rmsnorm",
        position="rotary", activation="swiglu", bias=False, tie_embeddings=False,
    ),
}


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(c.vocab_size, c.n_embd),
                drop=nn.Dropout(c.dropout),
                h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
            )
        )
        if c.position == "learned":
            self.transformer["wpe"] = nn.Embedding(c.block_size, c.n_embd)
        elif c.position == "sinusoidal":
            self.sinusoids = SinusoidalPositions(c.block_size, c.n_embd)
        elif c.position == "rotary":
            self.rotary = Rotary(c.block_size, c.head_dim, c.rope_theta)
        if c.norm_position == "pre":
            self.transformer["ln_f"] = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual output projections by 1/sqrt(2L) so the residual stream's variance
        # does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, matmul_only: bool = True) -> int:
        """Parameter count; `matmul_only` leaves out lookup-only tables (positions, and the input
        embedding when it is not tied to the output layer), the N of the 6N FLOPs estimate."""
        n = sum(p.numel() for p in self.parameters())
        if matmul_only:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        return self.config.flops_per_token(self.num_params())

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        c = self.config
        p = self.lm_head.weight
        return KVCache(c.n_layer, batch_size, c.n_kv_head, max_len or c.block_size, c.head_dim, p.dtype, p.device)

    def forward(
        self,
        idx: torch.Tensor,  # (B, T) token ids
        *,
        attention_mask: torch.Tensor | None = None,  # (B, past + T): 1 for tokens, 0 for padding
        position_ids: torch.Tensor | None = None,  # (B, T); default: past .. past + T - 1
        kv_cache: KVCache | None = None,
        last_only: bool = False,  # return logits for the last position only (decoding)
    ) -> torch.Tensor:
        """Next-token logits, (B, T, vocab) or (B, 1, vocab) with `last_only`."""
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the model's context ({self.config.block_size})"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device)[None]  # (1, T)

        x, rope = self.embed(idx, position_ids)
        attn_mask = attention_mask_for(T, past, attention_mask, causal=True, device=idx.device)
        # SDPA's is_causal aligns the mask top-left, right only when there is no cached past
        is_causal = attn_mask is None and past == 0
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope, kv_cache=kv_cache, layer_idx=i)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.head(x[:, -1:] if last_only else x)

    # `forward` is embed -> blocks -> head; the two ends are methods of their own so that a decode
    # step with its own masking (`lmforge.generate.fast`) can reuse them
    def embed(
        self, idx: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token (+ position) embeddings (B, T, C), and the rotary tables when positions rotate
        queries and keys inside attention instead."""
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(position_ids)
        elif self.config.position == "sinusoidal":
            x = x + self.sinusoids(position_ids).to(x.dtype)
        elif self.config.position == "rotary":
            rope = self.rotary(position_ids)
        return self.transformer.drop(x), rope

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: (B, T, C) hidden states -> (B, T, vocab) logits."""
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
        return self.lm_head(x)
