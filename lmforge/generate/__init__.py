"""Decoding: sampling processors, beam search, a batched, KV-cached engine that wraps any
lmforge LM, and its counterpart for encoder-decoders (`translate`)."""

from lmforge.generate.beam import Hypothesis, beam_search
from lmforge.generate.config import GenerationConfig
from lmforge.generate.engine import Generation, generate, generate_ids
from lmforge.generate.seq2seq import generate_seq2seq_hypotheses, generate_seq2seq_ids, translate

__all__ = [
    "Generation", "GenerationConfig", "Hypothesis", "beam_search", "generate", "generate_ids",
    "generate_seq2seq_hypotheses", "generate_seq2seq_ids", "translate",
]
