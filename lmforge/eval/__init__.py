"""Evaluation: perplexity of a text under a language model; BLEU/chrF/ROUGE of generated text."""

from lmforge.eval.perplexity import perplexity, perplexity_of_file
from lmforge.eval.seq2seq import corpus_scores, evaluate_generation

__all__ = ["corpus_scores", "evaluate_generation", "perplexity", "perplexity_of_file"]
