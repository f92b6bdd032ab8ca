"""Shared fixtures: tiny models and tokenizers built from configs, never downloaded."""

from __future__ import annotations

import pytest
import torch

from lmforge.models import GPT, GPTConfig
from lmforge.tokenizer import train_tokenizer

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model learns to predict the next token.\n"
    "Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump?\n"
) * 20


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def char_tokenizer():
    return train_tokenizer("char", [SAMPLE_TEXT])


@pytest.fixture
def bpe_tokenizer():
    return train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)


def tiny_gpt(vocab_size: int = 64, **overrides) -> GPT:
    config = GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size), **overrides})
    return GPT(config).eval()


@pytest.fixture
def tiny_model(char_tokenizer):
    return tiny_gpt(char_tokenizer.vocab_size)
