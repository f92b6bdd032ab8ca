"""Speculative decoding: the target's greedy output token for token, whatever the draft proposes;
acceptance counts; cache rollback; the errors a user can cause."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generate import (
    GenerationConfig,
    SpeculativeStats,
    fast,
    generate,
    generate_ids,
    speculative_generate_ids,
)
from lmforge.generate.speculative import check_draft_tokenizer
from lmforge.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmforge.nn import KVCache
from tests.conftest import tiny_gpt

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]


def greedy(**overrides) -> GenerationConfig:
    return GenerationConfig(**{"do_sample": False, "max_new_tokens": 12, **overrides})


@pytest.fixture
def target():
    return tiny_gpt(64)


def unrelated_draft():
    torch.manual_seed(123)  # other weights, another shape: it agrees with the target only by chance
    return tiny_gpt(64, n_layer=1, n_embd=16)


def constant_draft():
    """A draft whose logits are all zero, so it always proposes token 0: nearly all rejected."""
    draft = tiny_gpt(64, n_layer=1)
    with torch.no_grad():
        for p in draft.parameters():
            p.zero_()
    return draft


def check_same_as_greedy(target, draft, prompts, config) -> SpeculativeStats:
    expected = generate_ids(target, prompts, config)
    got, stats = speculative_generate_ids(target, draft, prompts, config)
    assert got == expected
    return stats


def test_draft_equal_to_target_accepts_everything(target):
    K = 4
    config = greedy(num_draft_tokens=K, max_new_tokens=1 + 3 * (K + 1))  # the prefill's token + 3 full passes
    stats = check_same_as_greedy(target, target, PROMPTS, config)
    assert stats.target_passes == 3 * len(PROMPTS)
    assert stats.accepted == stats.drafted == 3 * K * len(PROMPTS)
    assert stats.tokens_per_pass == K + 1 and stats.acceptance_rate == 1.0
    assert stats.as_dict()["tokens_per_pass"] == K + 1 and "5.00 tokens per target pass" in str(stats)


@pytest.mark.parametrize("make_draft", [unrelated_draft, constant_draft])
def test_any_draft_gives_the_targets_greedy_output(target, make_draft):
    stats = check_same_as_greedy(target, make_draft(), PROMPTS, greedy(max_new_tokens=20))
    assert stats.accepted < stats.drafted  # proposals were rejected, and the caches rolled back
    assert 1.0 <= stats.tokens_per_pass < 5


def test_constant_draft_is_mostly_rejected(target):
    stats = check_same_as_greedy(target, constant_draft(), PROMPTS, greedy(max_new_tokens=20))
    assert stats.acceptance_rate < 0.2


@pytest.mark.parametrize("K, max_new_tokens", [(1, 9), (2, 1), (2, 2), (7, 3), (50, 6)])
def test_draft_lengths_and_few_tokens(target, K, max_new_tokens):
    """K = 1; K longer than what is left (the proposals are cut so no pass overshoots)."""
    for draft in (target, unrelated_draft()):
        config = greedy(num_draft_tokens=K, max_new_tokens=max_new_tokens)
        check_same_as_greedy(target, draft, PROMPTS, config)
        assert all(len(ids) == max_new_tokens for ids in speculative_generate_ids(target, draft, PROMPTS, config)[0])


def test_eos_in_the_middle_ends_the_row(target):
    continuation = generate_ids(target, [PROMPTS[1]], greedy(max_new_tokens=20))[0]
    eos = continuation[5]
    config = greedy(max_new_tokens=20, eos_token_id=eos, num_draft_tokens=4)
    expected = generate_ids(target, PROMPTS, config)
    assert len(expected[1]) == continuation.index(eos)  # it stops there, eos not included
    for draft in (target, unrelated_draft()):
        assert speculative_generate_ids(target, draft, PROMPTS, config)[0] == expected


def test_up_to_the_context_limit(target):
    """prompt + max_new_tokens == block_size: the caches fill to their last slot."""
    block = target.config.block_size
    prompts = [list(range(1, 21)), [3, 4]]
    for K in (3, 4, 11):
        config = greedy(max_new_tokens=block - 20, num_draft_tokens=K)
        check_same_as_greedy(target, target, prompts, config)
        check_same_as_greedy(target, unrelated_draft(), prompts, config)


def test_penalties_and_min_new_tokens_are_the_targets(target):
    """Every kept token is the target's choice after its history, penalties included."""
    eos = generate_ids(target, [PROMPTS[0]], greedy(max_new_tokens=3))[0][1]
    config = greedy(max_new_tokens=16, repetition_penalty=1.5, no_repeat_ngram_size=2,
                    presence_penalty=0.5, eos_token_id=eos, min_new_tokens=4)
    check_same_as_greedy(target, target, PROMPTS, config)
    check_same_as_greedy(target, unrelated_draft(), PROMPTS, config)


def test_rotary_gqa_target_and_several_sequences():
    target = tiny_gpt(64, position="rotary", n_kv_head=1, norm="rmsnorm", activation="swiglu", bias=False)
    config = greedy(num_return_sequences=2)
    check_same_as_greedy(target, unrelated_draft(), PROMPTS, config)


def test_generate_ids_and_generate_take_a_draft(target, char_tokenizer):
    model = tiny_gpt(char_tokenizer.vocab_size)
    torch.manual_seed(7)
    draft = tiny_gpt(char_tokenizer.vocab_size, n_layer=1)
    stats = SpeculativeStats()
    config = greedy(max_new_tokens=15)
    prompts = ["The quick", "Pack my box"]
    ids = [char_tokenizer.encode(p) for p in prompts]
    assert generate_ids(model, ids, config, draft_model=draft, speculative_stats=stats) == generate_ids(
        model, ids, config
    )
    assert stats.target_passes > 0

    # stop strings and streaming through the same machinery: pick a stop string from the output
    plain = generate(model, char_tokenizer, prompts, config)
    stop = plain[0].text[4:6]
    config = greedy(max_new_tokens=15, stop=[stop])
    pieces: dict[int, list[str]] = {}
    expected = generate(model, char_tokenizer, prompts, config)
    got = generate(model, char_tokenizer, prompts, config, draft_model=draft,
                   on_text=lambda i, piece: pieces.setdefault(i, []).append(piece))
    assert got == expected
    assert got[0].finish_reason == "stop" and stop not in got[0].text
    assert ["".join(pieces.get(i, [])) for i in range(len(got))] == [r.text for r in got]


def test_kv_cache_truncate():
    cache = KVCache(1, 1, 1, 8, 2)
    cache.advance(5)
    cache.truncate(3)
    assert cache.pos == 3
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(4)  # cannot grow: those slots were never written


@pytest.mark.parametrize(
    "config, message",
    [
        (GenerationConfig(do_sample=True), "greedy decoding only"),
        (GenerationConfig(do_sample=False, num_beams=2), "greedy decoding only"),
    ],
)
def test_greedy_only(target, config, message):
    with pytest.raises(LmforgeError, match=message):
        speculative_generate_ids(target, target, PROMPTS, config)
    with pytest.raises(LmforgeError, match=message):
        generate_ids(target, PROMPTS, config, draft_model=target)


def test_greedy_only_through_generate(char_tokenizer):
    model = tiny_gpt(char_tokenizer.vocab_size)
    for config in (GenerationConfig(do_sample=True), GenerationConfig(do_sample=False, num_beams=2)):
        with pytest.raises(LmforgeError, match="returns the target's greedy output"):
            generate(model, char_tokenizer, "The", config, draft_model=model)


def test_draft_mismatches(target, char_tokenizer, bpe_tokenizer):
    with pytest.raises(LmforgeError, match="vocabulary"):
        speculative_generate_ids(target, tiny_gpt(65), PROMPTS, greedy())
    encdec = EncoderDecoder(EncoderDecoderConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    with pytest.raises(LmforgeError, match="decoder-only"):
        speculative_generate_ids(target, encdec, PROMPTS, greedy())
    with pytest.raises(LmforgeError, match="draft's context"):
        speculative_generate_ids(target, tiny_gpt(64, block_size=16), PROMPTS, greedy(max_new_tokens=12))
    with pytest.raises(LmforgeError, match="tokenizer"):
        check_draft_tokenizer(char_tokenizer, bpe_tokenizer)
    check_draft_tokenizer(bpe_tokenizer, bpe_tokenizer)  # the same one passes


@pytest.mark.parametrize("make_draft", [lambda t: t, lambda t: unrelated_draft(), lambda t: constant_draft()],
                         ids=["same", "unrelated", "constant"])
@pytest.mark.parametrize("K, max_new_tokens", [(1, 12), (4, 12), (4, 1), (3, 29)])
def test_static_draft_steps_propose_what_eager_ones_do(target, make_draft, K, max_new_tokens, monkeypatch):
    """compile=True runs the draft's one-token steps through the static-shape step (here left
    uncompiled): catching up after full acceptance, rolling back after rejections, up to the
    context limit (prompt 3 + 29 = the tiny models' 32), it proposes what eager steps propose."""
    monkeypatch.setattr(fast, "_compiled_step", lambda: fast._static_step)
    draft = make_draft(target)
    config = greedy(num_draft_tokens=K, max_new_tokens=max_new_tokens)
    prompts = PROMPTS if max_new_tokens < 29 else PROMPTS[:1]
    eager_ids, eager_stats = speculative_generate_ids(target, draft, prompts, config)
    static_ids, static_stats = speculative_generate_ids(
        target, draft, prompts, greedy(num_draft_tokens=K, max_new_tokens=max_new_tokens, compile=True)
    )
    assert static_ids == eager_ids == generate_ids(target, prompts, config)
    assert static_stats == eager_stats


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_draft_gives_the_targets_greedy_output(target):
    draft = unrelated_draft()
    expected = generate_ids(target, PROMPTS, greedy(max_new_tokens=8))
    config = greedy(max_new_tokens=8, compile=True)
    assert speculative_generate_ids(target, draft, PROMPTS, config)[0] == expected
    assert generate_ids(target, PROMPTS, config, draft_model=draft) == expected  # the graph, reused
