"""Decoding: sampling processors and a batched, KV-cached engine that wraps any lmforge LM."""

from lmforge.generate.config import GenerationConfig
from lmforge.generate.engine import Generation, generate, generate_ids

__all__ = ["Generation", "GenerationConfig", "generate", "generate_ids"]
