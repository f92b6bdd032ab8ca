"""Building blocks shared by every model family (GPT, BERT, encoder-decoder)."""

from lmforge.nn.attention import CrossAttention, CrossKV, KVCache, SelfAttention, attention_mask_for
from lmforge.nn.block import Block, DecoderBlock
from lmforge.nn.config import TransformerConfig
from lmforge.nn.mlp import MLP
from lmforge.nn.norms import LayerNorm, RMSNorm, make_norm
from lmforge.nn.positions import (
    RelativePositionBias,
    Rotary,
    SinusoidalPositions,
    apply_rotary,
    relative_position_bucket,
    sinusoidal_table,
)

__all__ = [
    "MLP", "Block", "CrossAttention", "CrossKV", "DecoderBlock", "KVCache", "LayerNorm", "RMSNorm",
    "RelativePositionBias", "Rotary", "SelfAttention", "SinusoidalPositions", "TransformerConfig",
    "apply_rotary", "attention_mask_for", "make_norm", "relative_position_bucket", "sinusoidal_table",
]
