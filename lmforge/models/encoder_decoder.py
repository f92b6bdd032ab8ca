"""Encoder-decoder Transformer: the original Transformer (Vaswani et al. 2017) and T5 (Raffel et al. 2020).

Choices, all set by `EncoderDecoderConfig`:
- two stacks: the encoder (bidirectional self-attention over the source; the shared `Block`) and
  the decoder (causal self-attention, cross-attention to the encoder output, MLP; `DecoderBlock`);
  a pre-norm stack ends with a final norm `ln_f`, a post-norm one is normalised already;
- norms: post-norm LayerNorm (the original Transformer) or pre-norm RMSNorm without biases (T5);
- positions: fixed sinusoids (the original), learned tables, or T5's relative position bias
  (key - query offsets in log-spaced buckets, bidirectional in the encoder and causal in the
  decoder; one table per stack, computed once per forward and shared by all its layers);
- embeddings: one table for source and target tokens (`share_embeddings`), multiplied by
  sqrt(n_embd) in the original (`scale_embeddings`, section 3.4); the output projection `lm_head`
  tied to the target table (`tie_embeddings`). T5 v1.0 also rescales the decoder output by
  n_embd**-0.5 before `lm_head` (`scale_decoder_output`); T5 v1.1 unties and does not;
- attention: scores scaled by 1/sqrt(head_dim), or not at all (`scale_attn=False`, T5, which
  folds the scale into the query initialisation); T5's head size may differ from n_embd / n_head
  (`head_size`);
- MLP: ReLU (the original, T5 v1.0), GeGLU (T5 v1.1's "gated-gelu"), or any shared activation;
- dropout: on the embeddings, the attention probabilities and each sublayer's output; after the
  MLP activation (`activation_dropout`) and after a pre-norm stack's final norm, as T5 does.

The decoder reads `decoder_input_ids` that begin with `decoder_start_token_id` (T5: the padding
token 0) and predicts the next target token at every position. For incremental decoding the
encoder runs once (`encode`), the cross-attention keys/values are projected once (`cross_kv`),
and every `decode` call appends the new target tokens to the decoder's `KVCache`.

Module names are lmforge's (`encoder.h.0.attn.c_attn`, `decoder.h.0.cross_attn.c_attn`, ...);
`lmforge.interop.hf_t5` maps them to Hugging Face T5's. The model computes no losses and knows
nothing of training or search: those wrap it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lmforge.config import check
from lmforge.nn import (
    Block,
    CrossKV,
    DecoderBlock,
    KVCache,
    RelativePositionBias,
    SelfAttention,
    SinusoidalPositions,
    attention_mask_for,
    make_norm,
)
from lmforge.nn.config import TransformerConfig


@dataclass
class EncoderDecoderConfig(TransformerConfig):
    vocab_size: int = 32000  # source and target tokens share one vocabulary
    n_decoder_layer: int | None = None  # None: as many as the encoder's n_layer
    max_position: int = 512  # longest source or target with learned or sinusoidal positions
    share_embeddings: bool = True  # one token table for source and target
    tie_embeddings: bool = True  # lm_head is the target token table
    scale_embeddings: bool = True  # token embeddings * sqrt(n_embd), Vaswani et al. 3.4
    scale_decoder_output: bool = False  # decoder output * n_embd**-0.5 before lm_head (T5 v1.0)
    scale_attn: bool = True  # scores / sqrt(head_size); T5 does not scale
    activation_dropout: float = 0.0  # dropout after the MLP activation (T5: the model's dropout)
    relative_buckets: int = 32  # position="relative": buckets of key - query offsets
    relative_max_distance: int = 128  # offsets this far or farther share the last bucket
    pad_token_id: int = 0
    decoder_start_token_id: int = 0  # the first decoder input; T5 starts with its padding token
    eos_token_id: int | None = None  # ends a target sequence; None: the tokenizer's
    # the original Transformer's choices where they differ from the shared defaults
    dropout: float = 0.1
    norm_position: Literal["pre", "post"] = "post"
    position: Literal["learned", "sinusoidal", "relative"] = "sinusoidal"
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"] = "relu"

    position_choices: ClassVar[tuple[str, ...]] = ("learned", "sinusoidal", "relative")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        check(self.n_decoder_layer >= 1, f"n_decoder_layer must be >= 1, got {self.n_decoder_layer}")
        check(self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}")
        check(self.max_position >= 1, f"max_position must be >= 1, got {self.max_position}")
        check(
            0.0 <= self.activation_dropout < 1.0,
            f"activation_dropout must be in [0, 1), got {self.activation_dropout}",
        )
        if self.position == "relative":
            # the encoder splits the buckets between two directions and then keeps half of each
            # for exact offsets, so it needs 4 to have one exact bucket per direction
            check(self.relative_buckets >= 4, f"relative_buckets must be >= 4, got {self.relative_buckets}")
            check(
                self.relative_max_distance > self.relative_buckets // 2,
                f"relative_max_distance={self.relative_max_distance} must be > relative_buckets // 2 "
                f"= {self.relative_buckets // 2} (the offsets counted exactly)",
            )
        for name in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(self, name)
            check(
                value is None or 0 <= value < self.vocab_size,
                f"{name} must be in [0, vocab_size={self.vocab_size}), got {value}",
            )


# Presets are data: names users can pass to `--preset`. The vocabulary comes from the tokenizer.
_T5 = dict(
    norm="rmsnorm", norm_position="pre", norm_eps=1e-6, bias=False, position="relative",
    scale_embeddings=False, scale_attn=False, scale_decoder_output=True, activation="relu",
    activation_dropout=0.1,
)
ENCDEC_PRESETS: dict[str, dict] = {
    # the original Transformer: post-LN, sinusoids, ReLU, one shared and tied vocabulary; a size
    # that trains on a CPU, and the paper's base model
    "transformer-tiny": dict(n_layer=3, n_head=4, n_embd=256, mlp_hidden=1024, max_position=256),
    "transformer-base": dict(n_layer=6, n_head=8, n_embd=512, mlp_hidden=2048),
    # T5 v1.0 (pre-norm RMSNorm, relative position bias, no biases, unscaled attention, tied and
    # rescaled output); v1.1 is activation="geglu", tie_embeddings=false, scale_decoder_output=false
    "t5-tiny": dict(n_layer=3, n_head=4, n_embd=256, mlp_hidden=1024, **_T5),
    "t5-small": dict(n_layer=6, n_head=8, n_embd=512, mlp_hidden=2048, **_T5),
}


def _block_options(c: EncoderDecoderConfig) -> dict:
    return dict(attn_scale=None if c.scale_attn else 1.0, mlp_hidden_dropout=c.activation_dropout)


class Stack(nn.Module):
    """What the encoder and decoder share: token embedding (+ positions), dropout, final norm."""

    def __init__(self, c: EncoderDecoderConfig, wte: nn.Embedding, causal: bool):
        super().__init__()
        self.wte = wte
        self.wpe = self.sinusoids = self.rel_bias = None
        if c.position == "learned":
            self.wpe = nn.Embedding(c.max_position, c.n_embd)
        elif c.position == "sinusoidal":
            self.sinusoids = SinusoidalPositions(c.max_position, c.n_embd)
        else:  # T5: the encoder sees keys on both sides of a query, the decoder only earlier ones
            self.rel_bias = RelativePositionBias(
                c.n_head, c.relative_buckets, c.relative_max_distance, bidirectional=not causal
            )
        self.embed_scale = math.sqrt(c.n_embd) if c.scale_embeddings else None
        self.max_position = c.max_position
        self.drop = nn.Dropout(c.dropout)
        self.ln_f = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias) if c.norm_position == "pre" else None

    def embed(self, ids: torch.Tensor, past: int = 0) -> torch.Tensor:
        """(B, T) token ids at positions past .. past + T - 1 -> (B, T, C)"""
        T = ids.shape[1]
        if self.rel_bias is None and past + T > self.max_position:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's {self.max_position} positions")
        x = self.wte(ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        positions = torch.arange(past, past + T, device=ids.device)[None]  # (1, T)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        elif self.sinusoids is not None:
            x = x + self.sinusoids(positions).to(x.dtype)
        return self.drop(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.ln_f is None else self.drop(self.ln_f(x))


class Encoder(Stack):
    def __init__(self, c: EncoderDecoderConfig, wte: nn.Embedding):
        super().__init__(c, wte, causal=False)
        self.h = nn.ModuleList([Block(c, **_block_options(c)) for _ in range(c.n_layer)])

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S)
        attention_mask: torch.Tensor | None = None,  # (B, S): 1 for tokens, 0 for padding
    ) -> torch.Tensor:
        S = input_ids.shape[1]
        x = self.embed(input_ids)  # (B, S, C)
        # Every query sees the same keys, so a (B, 1, 1, S) key mask suffices (as in BERT);
        # with a relative bias it becomes a float mask (B, H, S, S), built once for all layers
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        if self.rel_bias is not None:
            mask = self.rel_bias(S, S, allowed=mask)
        for block in self.h:
            x = block(x, attn_mask=mask)
        return self.finish(x)


class Decoder(Stack):
    def __init__(self, c: EncoderDecoderConfig, wte: nn.Embedding):
        super().__init__(c, wte, causal=True)
        self.h = nn.ModuleList([DecoderBlock(c, **_block_options(c)) for _ in range(c.n_decoder_layer)])

    def forward(
        self,
        ids: torch.Tensor,  # (B, T) target tokens
        cross_kv: CrossKV,  # the encoder output's keys/values for each layer
        cross_mask: torch.Tensor | None,  # (B, 1, 1, S) True for source tokens
        attention_mask: torch.Tensor | None = None,  # (B, past + T): 1 for tokens, 0 for padding
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        T = ids.shape[1]
        past = kv_cache.pos if kv_cache is not None else 0
        x = self.embed(ids, past)  # (B, T, C)
        allowed = attention_mask_for(T, past, attention_mask, causal=True, device=ids.device)
        if self.rel_bias is None:
            # SDPA's is_causal aligns the mask top-left, right only when there is no cached past
            mask, is_causal = allowed, allowed is None and past == 0
        else:
            if allowed is None and T > 1:  # the plain causal case; a float mask must spell it out
                allowed = torch.ones(T, past + T, dtype=torch.bool, device=ids.device).tril(past)
            mask, is_causal = self.rel_bias(T, past + T, past, allowed), False
        for i, block in enumerate(self.h):
            x = block(
                x, cross_kv[i], attn_mask=mask, is_causal=is_causal, cross_mask=cross_mask,
                kv_cache=kv_cache, layer_idx=i,
            )
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.finish(x)


class EncoderDecoder(nn.Module):
    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        self.config = c = config
        source = nn.Embedding(c.vocab_size, c.n_embd)
        self.encoder = Encoder(c, source)
        self.decoder = Decoder(c, source if c.share_embeddings else nn.Embedding(c.vocab_size, c.n_embd))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.decoder.wte.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Variance-preserving: every matrix N(0, 1/fan_in), norms 1, biases 0. Lookup tables get
        N(0, 1/n_embd), so that the sqrt(n_embd)-scaled embeddings have unit variance, except
        unscaled token tables (T5), N(0, 1). Unscaled attention (T5) starts its query projection
        1/sqrt(head_size) smaller instead: Raffel et al.'s folded-in scale."""
        c = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features**-0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            if isinstance(m, SelfAttention) and not c.scale_attn:  # also CrossAttention
                m.c_attn.weight[: m.n_head * m.head_dim] *= m.head_dim**-0.5
        # tables last: a tied lm_head is the target table and keeps the table's initialisation
        tokens = {self.encoder.wte, self.decoder.wte}
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                unit = m in tokens and not c.scale_embeddings
                nn.init.normal_(m.weight, std=1.0 if unit else c.n_embd**-0.5)

    def num_params(self, matmul_only: bool = True) -> int:
        """Parameter count; `matmul_only` leaves out lookup-only tables (positions, the relative
        bias, token tables that are not also the tied lm_head), the N of the 6N FLOPs estimate."""
        params = {id(p): p for p in self.parameters()}
        if matmul_only:
            for m in self.modules():
                if isinstance(m, nn.Embedding) and m.weight is not self.lm_head.weight:
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per target token for sources and targets of `seq_len` tokens: 6N for the
        matmul weights (each source token paired with one target token, so the encoder's weights
        count once too), plus 12 * d_attn * T per attention (PaLM appendix B): encoder and decoder
        self-attention and cross-attention, all over T keys."""
        c = self.config
        d_attn = c.n_head * c.head_dim
        return int(6 * self.num_params() + 12 * d_attn * seq_len * (c.n_layer + 2 * c.n_decoder_layer))

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """The decoder's self-attention cache, for up to `max_len` target tokens."""
        c = self.config
        p = self.lm_head.weight
        return KVCache(
            c.n_decoder_layer, batch_size, c.n_kv_head, max_len or c.max_position, c.head_dim, p.dtype, p.device
        )

    def encode(
        self,
        input_ids: torch.Tensor,  # (B, S) source token ids
        attention_mask: torch.Tensor | None = None,  # (B, S): 1 for tokens, 0 for padding
    ) -> torch.Tensor:
        """The encoder output, (B, S, C)."""
        return self.encoder(input_ids, attention_mask)

    def cross_kv(self, encoder_out: torch.Tensor) -> CrossKV:
        """Every decoder layer's cross-attention keys/values of `encoder_out`: once per source."""
        return CrossKV([block.cross_attn.project_kv(encoder_out) for block in self.decoder.h])

    def decode(
        self,
        decoder_input_ids: torch.Tensor,  # (B, T) target tokens: all of them, or the new ones
        encoder_out: torch.Tensor | None = None,  # (B, S, C); not needed when cross_kv is given
        encoder_mask: torch.Tensor | None = None,  # (B, S): 1 for source tokens, 0 for padding
        *,
        decoder_attention_mask: torch.Tensor | None = None,  # (B, past + T): 1 tokens, 0 padding
        kv_cache: KVCache | None = None,  # appended to: pass the T new tokens only
        cross_kv: CrossKV | None = None,  # from `cross_kv(encoder_out)`, reused across steps
        last_only: bool = False,  # logits for the last position only (decoding)
    ) -> torch.Tensor:
        """Next-token logits, (B, T, vocab) or (B, 1, vocab) with `last_only`."""
        if cross_kv is None:
            if encoder_out is None:
                raise ValueError("decode needs encoder_out or cross_kv")
            cross_kv = self.cross_kv(encoder_out)
        cross_mask = None if encoder_mask is None else encoder_mask[:, None, None, :].bool()
        x = self.decoder(decoder_input_ids, cross_kv, cross_mask, decoder_attention_mask, kv_cache)
        if last_only:
            x = x[:, -1:]
        if self.config.scale_decoder_output:
            x = x * self.config.n_embd**-0.5
        return self.lm_head(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S) source token ids
        attention_mask: torch.Tensor | None = None,  # (B, S): 1 for tokens, 0 for padding
        *,
        decoder_input_ids: torch.Tensor,  # (B, T): decoder_start_token_id, then the target
        decoder_attention_mask: torch.Tensor | None = None,  # (B, T): 1 for tokens, 0 for padding
    ) -> torch.Tensor:
        """Next-target-token logits at every decoder position, (B, T, vocab)."""
        encoder_out = self.encode(input_ids, attention_mask)
        return self.decode(
            decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask=decoder_attention_mask
        )
