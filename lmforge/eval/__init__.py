"""Evaluation: perplexity of a text under a language model."""

from lmforge.eval.perplexity import perplexity, perplexity_of_file

__all__ = ["perplexity", "perplexity_of_file"]
