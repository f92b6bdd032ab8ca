"""Decoding: sampling processors, beam search, a batched, KV-cached engine that wraps any
lmforge LM, and its counterpart for encoder-decoders (`translate`)."""

from lmforge.generate.beam import Hypothesis, beam_search
from lmforge.generate.config import GenerationConfig
from lmforge.generate.engine import Generation, generate, generate_ids
from lmforge.generate.fast import inference_dtype
from lmforge.generate.seq2seq import generate_seq2seq_hypotheses, generate_seq2seq_ids, translate
from lmforge.generate.speculative import SpeculativeStats, speculative_generate_ids

__all__ = [
    "Generation", "GenerationConfig", "Hypothesis", "SpeculativeStats", "beam_search", "generate",
    "generate_ids", "generate_seq2seq_hypotheses", "generate_seq2seq_ids", "inference_dtype",
    "speculative_generate_ids", "translate",
]
