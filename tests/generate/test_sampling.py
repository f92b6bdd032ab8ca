"""Each logits processor against its Hugging Face twin, and the sampling it leads to."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig
from lmforge.generate.sampling import (
    PAD,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    ban_repeated_ngrams,
    min_p_filter,
    next_tokens,
    process_logits,
    sequence_generator,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

B, T, V = 6, 12, 50


def random_logits(scale: float = 3.0) -> torch.Tensor:
    return torch.randn(B, V) * scale


def random_ids(high: int = V) -> torch.Tensor:
    return torch.randint(0, high, (B, T))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_matches_hf(temperature):
    logits, ids = random_logits(), random_ids()
    expected = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    assert torch.equal(apply_temperature(logits, temperature), expected)


@pytest.mark.parametrize("k", [1, 5, V, V + 10])
def test_top_k_matches_hf(k):
    logits, ids = random_logits(), random_ids()
    assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_matches_hf(p):
    logits, ids = random_logits(), random_ids()
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits.clone()))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.99])
def test_min_p_matches_hf(min_p):
    logits, ids = random_logits(), random_ids()
    assert torch.equal(min_p_filter(logits, min_p), MinPLogitsWarper(min_p)(ids, logits.clone()))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    logits, ids = random_logits(), random_ids()
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, ids, penalty), expected)


@pytest.mark.parametrize("n", [1, 2, 3, T + 1])
def test_no_repeat_ngram_matches_hf(n):
    logits, ids = random_logits(), random_ids(high=4)  # a small alphabet, so n-grams repeat
    expected = NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
    ours = ban_repeated_ngrams(logits, ids, n)
    assert torch.equal(ours, expected)
    if n <= 3:
        assert torch.isneginf(ours).any()  # the comparison did exercise a ban


def test_history_processors_ignore_left_padding():
    # a left-padded row must be processed as the same row without its padding
    logits = random_logits()
    ids = random_ids(high=4)
    padded = ids.clone()
    padded[1, :5] = PAD
    padded[3, : T - 1] = PAD  # a single real token
    for row, start in ((1, 5), (3, T - 1)):
        one = ids[row : row + 1, start:]
        got = apply_repetition_penalty(logits, padded, 1.7)[row]
        assert torch.equal(got, apply_repetition_penalty(logits[row : row + 1], one, 1.7)[0])
        for n in (2, 3):
            got = ban_repeated_ngrams(logits, padded, n)[row]
            assert torch.equal(got, ban_repeated_ngrams(logits[row : row + 1], one, n)[0])


def test_greedy_is_argmax_after_penalties_only():
    logits, ids = random_logits(), random_ids()
    # warpers are ignored by greedy decoding; the penalties are not
    config = GenerationConfig(
        do_sample=False, temperature=0.1, top_k=3, top_p=0.2, repetition_penalty=3.0
    )
    expected = apply_repetition_penalty(logits, ids, 3.0).argmax(-1)
    assert torch.equal(next_tokens(logits, ids, config), expected)
    assert torch.equal(
        process_logits(logits, ids, config), apply_repetition_penalty(logits, ids, 3.0)
    )


def draws(logits: torch.Tensor, config: GenerationConfig, n: int = 4000) -> torch.Tensor:
    """n samples from one row of logits."""
    generator = torch.Generator().manual_seed(0)
    rows = logits[None].expand(n, -1)
    return next_tokens(rows, torch.zeros(n, 1, dtype=torch.long), config, generator)


def test_low_temperature_is_greedy_and_high_temperature_flattens():
    logits = torch.randn(V) * 2
    assert set(draws(logits, GenerationConfig(temperature=1e-4)).tolist()) == {
        logits.argmax().item()
    }
    probs = [apply_temperature(logits, t).softmax(-1) for t in (0.5, 1.0, 10.0)]
    entropy = [-(p * p.log()).sum().item() for p in probs]
    assert entropy[0] < entropy[1] < entropy[2] <= torch.log(torch.tensor(float(V))).item()
    # and the draws follow: many distinct tokens at a high temperature
    assert len(set(draws(logits, GenerationConfig(temperature=10.0)).tolist())) > 0.8 * V


def test_top_k_samples_only_the_top_k():
    logits = torch.randn(V) * 0.5  # flat enough that all k show up
    top = set(logits.topk(5).indices.tolist())
    assert set(draws(logits, GenerationConfig(top_k=5)).tolist()) == top


def test_top_p_samples_only_the_nucleus():
    logits = torch.randn(V)
    probs, order = logits.softmax(-1).sort(descending=True)
    size = int((probs.cumsum(0) < 0.6).sum()) + 1  # smallest set reaching 0.6
    nucleus = set(order[:size].tolist())
    seen = set(draws(logits, GenerationConfig(top_p=0.6)).tolist())
    assert seen == nucleus and len(seen) > 1


def test_min_p_samples_only_likely_tokens():
    logits = torch.randn(V)
    probs = logits.softmax(-1)
    kept = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    seen = set(draws(logits, GenerationConfig(min_p=0.2)).tolist())
    assert seen == kept and len(seen) > 1


def test_seeded_draws_repeat():
    logits = random_logits()
    config = GenerationConfig()
    a = next_tokens(logits, random_ids(), config, torch.Generator().manual_seed(7))
    b = next_tokens(logits, random_ids(), config, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_every_token_banned_is_a_clear_error():
    ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(LmforgeError, match="no_repeat_ngram_size=1"):
        next_tokens(torch.zeros(1, 3), ids, GenerationConfig(no_repeat_ngram_size=1))


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = random_logits()
    ids = torch.tensor([[3, 3, 3, 7, PAD, 3, 9, 9]]).expand(B, -1)  # the prompt is the first 4
    config = GenerationConfig(do_sample=False, presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(logits, ids, config, prompt_len=4)
    expected = logits.clone()
    expected[:, 3] -= 0.5 + 0.25  # once after the prompt
    expected[:, 9] -= 0.5 + 2 * 0.25
    assert torch.allclose(out, expected)
    assert torch.equal(apply_presence_frequency_penalty(logits, ids[:, :0], 1.0, 1.0), logits)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_openai_penalties_are_validated(field):
    with pytest.raises(LmforgeError, match=rf"{field} must be in \[-2, 2\]"):
        GenerationConfig(**{field: 2.5})
    with pytest.raises(LmforgeError, match="not to beam search"):
        GenerationConfig(do_sample=False, num_beams=2, **{field: 1.0})


def test_a_row_with_its_own_generator_draws_as_a_batch_of_one():
    logits, ids, config = random_logits(1.0), random_ids(), GenerationConfig()
    seeds = [sequence_generator(3, r) for r in range(B)]
    batch = next_tokens(logits, ids, config, seeds)
    alone = [next_tokens(logits[r : r + 1], ids[r : r + 1], config, sequence_generator(3, r)) for r in range(B)]
    assert batch.tolist() == torch.cat(alone).tolist()
    # seed + choice: choice 0 is a plain generator with the seed
    assert torch.equal(sequence_generator(3, 2).get_state(), torch.Generator().manual_seed(5).get_state())


def test_token_logprobs_are_the_raw_distribution():
    logits = random_logits()
    chosen = logits.argmin(dim=-1)
    lp, top_values, top_ids = token_logprobs(logits, chosen, 3)
    expected = logits.log_softmax(-1)
    assert torch.allclose(lp, expected.gather(1, chosen[:, None])[:, 0])
    best = expected.topk(3)
    assert torch.equal(top_ids, best.indices) and torch.allclose(top_values, best.values)
