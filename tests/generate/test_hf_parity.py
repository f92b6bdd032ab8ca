"""End-to-end parity with Hugging Face `generate`: the same tiny GPT-2 weights, the same options,
the same tokens, for greedy and for seeded sampling, with left-padded batches."""

from __future__ import annotations

import pytest
import torch

from lmforge.generate import GenerationConfig, generate_ids
from lmforge.interop.hf_gpt2 import save
from tests.conftest import tiny_gpt

transformers = pytest.importorskip("transformers")
from transformers import GPT2LMHeadModel  # noqa: E402

PROMPTS = ["The quick brown fox", "Pack", "How vexingly"]
OPTIONS = {
    "greedy": dict(do_sample=False),
    "greedy-penalties": dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2),
    "sample-top-p": dict(do_sample=True, top_p=0.8),
    "sample-warpers": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.1),
    "sample-penalties": dict(
        do_sample=True, repetition_penalty=1.2, no_repeat_ngram_size=3, top_k=40
    ),
}


@pytest.fixture
def pair(tmp_path, bpe_tokenizer):
    # a sharper-than-init model, so the choices are not near-ties that rounding could flip
    model = tiny_gpt(bpe_tokenizer.vocab_size, block_size=64)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    save(tmp_path, model, bpe_tokenizer)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    return model, hf


def hf_generate(
    hf, prompt_ids: list[list[int]], options: dict, n_new: int, seed: int
) -> list[list[int]]:
    L = max(map(len, prompt_ids))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompt_ids])
    torch.manual_seed(seed)  # HF samples from the global RNG; ours from a generator with this seed
    out = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        eos_token_id=None,
        pad_token_id=0,
        top_k=options.pop("top_k", 0),
        **options,
    )
    return out[:, L:].tolist()


@pytest.mark.parametrize("name", OPTIONS)
def test_same_tokens_as_hf_generate(pair, bpe_tokenizer, name):
    model, hf = pair
    prompt_ids = bpe_tokenizer.encode_batch(PROMPTS)
    config = GenerationConfig(max_new_tokens=15, seed=4, **OPTIONS[name])
    ours = generate_ids(model, prompt_ids, config)
    if not config.do_sample:  # greedy: the left-padded batch against HF's
        assert ours == hf_generate(hf, prompt_ids, dict(OPTIONS[name]), 15, seed=4)
        return
    # HF draws the whole batch from the global RNG; each of our rows draws from its own generator
    # (seeded `seed` for a prompt's first sequence) so that it samples as it would alone: a row
    # of our batch equals HF given that prompt alone with the same seed
    for p, row in zip(prompt_ids, ours, strict=True):
        assert [row] == hf_generate(hf, [p], dict(OPTIONS[name]), 15, seed=4)
