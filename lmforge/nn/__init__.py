"""Building blocks shared by every model family (GPT, BERT, encoder-decoder)."""

from lmforge.nn.attention import KVCache, SelfAttention, attention_mask_for
from lmforge.nn.block import Block
from lmforge.nn.config import TransformerConfig
from lmforge.nn.mlp import MLP
from lmforge.nn.norms import LayerNorm, RMSNorm, make_norm
from lmforge.nn.positions import Rotary, SinusoidalPositions, apply_rotary, sinusoidal_table

__all__ = [
    "MLP", "Block", "KVCache", "LayerNorm", "RMSNorm", "Rotary", "SelfAttention",
    "SinusoidalPositions", "TransformerConfig", "apply_rotary", "attention_mask_for",
    "make_norm", "sinusoidal_table",
]
