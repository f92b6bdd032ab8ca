"""Decoding: sampling processors, beam search, and a batched, KV-cached engine that wraps any
lmforge LM."""

from lmforge.generate.beam import Hypothesis, beam_search
from lmforge.generate.config import GenerationConfig
from lmforge.generate.engine import Generation, generate, generate_ids

__all__ = ["Generation", "GenerationConfig", "Hypothesis", "beam_search", "generate", "generate_ids"]
