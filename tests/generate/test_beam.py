"""Beam search: the same tokens and scores as Hugging Face `generate(num_beams=...)` on the same
tiny GPT-2 weights, cached == uncached, batched == alone, the text API, the CLI and validation.

The parity models run in float64, so that both sides hand the search the same float32 log-probs
(both cast there) and no near-tie between beams can be flipped by rounding in the forward pass.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import build_parser, generation_config_from_args, main
from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, generate, generate_ids
from lmforge.generate.engine import _beam_decode
from lmforge.interop.hf_gpt2 import save
from lmforge.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_TEXT, tiny_gpt

transformers = pytest.importorskip("transformers")
from transformers import GPT2LMHeadModel  # noqa: E402

PROMPTS = ["The quick brown fox", "Pack", "How vexingly"]  # different lengths: left padding
N_NEW = 12


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    """The same random-init weights as an lmforge GPT and a transformers GPT2LMHeadModel."""
    torch.manual_seed(0)
    model = tiny_gpt(tokenizer.vocab_size, block_size=64)
    # At init a GPT with tied embeddings mostly repeats its last token; larger MLP weights give
    # varied continuations, so that beams, eos and the penalties all have choices to make.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name and p.dim() == 2:
                p.mul_(10)
    folder = tmp_path_factory.mktemp("hf")
    save(folder, model, tokenizer)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval().double()
    # no token defaults from the model: each call says which eos it wants
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    return model.double(), hf


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode_batch(PROMPTS)


@pytest.fixture(scope="module")
def eos(pair, prompt_ids):
    """A token the search meets a few steps in, so that hypotheses end early: the first one of
    the best beam's continuation from its 4th token on that is new to it and to every prompt."""
    model, _ = pair
    best = generate_ids(model, prompt_ids[:1], GenerationConfig(max_new_tokens=N_NEW, do_sample=False, num_beams=3))[0]
    seen = {t for p in prompt_ids for t in p}
    return next(t for i, t in enumerate(best) if i >= 3 and t not in best[:i] and t not in seen)


def hf_beam(hf, prompt_ids, options, eos, pad):
    """HF's hypotheses for left-padded prompts, cut before eos, and their scores."""
    L = max(map(len, prompt_ids))
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompt_ids])
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos,
        pad_token_id=pad, return_dict_in_generate=True, output_scores=True, **options,
    )
    rows = out.sequences[:, L:].tolist()
    if eos is not None:  # HF pads finished hypotheses with pad_token_id, here eos
        rows = [r[: r.index(eos)] if eos in r else r for r in rows]
    return rows, out.sequences_scores.tolist()


OPTIONS = {
    "beams-2": dict(num_beams=2),
    "beams-3": dict(num_beams=3),
    "beams-4-return-3": dict(num_beams=4, num_return_sequences=3),
    "length-penalty-negative": dict(num_beams=3, length_penalty=-1.0, num_return_sequences=2),
    "length-penalty-0": dict(num_beams=3, length_penalty=0.0, num_return_sequences=3),
    "length-penalty-2": dict(num_beams=4, length_penalty=2.0, num_return_sequences=4),
    "early-stopping-true": dict(num_beams=3, early_stopping=True, num_return_sequences=2),
    "early-stopping-never": dict(num_beams=3, early_stopping="never", num_return_sequences=2),
    "never-length-penalty-negative": dict(num_beams=3, early_stopping="never", length_penalty=-0.5),
    "never-length-penalty-2": dict(num_beams=2, early_stopping="never", length_penalty=2.0),
    "no-repeat-ngram": dict(num_beams=3, no_repeat_ngram_size=2, num_return_sequences=3),
    "repetition-penalty": dict(num_beams=3, repetition_penalty=1.5, num_return_sequences=2),
    "repetition-penalty-below-1": dict(num_beams=2, repetition_penalty=0.7),
    "min-new-tokens": dict(num_beams=3, min_new_tokens=6, num_return_sequences=3),
    "everything": dict(
        num_beams=5, num_return_sequences=5, repetition_penalty=1.3, no_repeat_ngram_size=3,
        min_new_tokens=3, length_penalty=1.5, early_stopping=True,
    ),
}


@pytest.mark.parametrize("with_eos", [True, False], ids=["eos", "no-eos"])
@pytest.mark.parametrize("name", OPTIONS)
def test_same_tokens_and_scores_as_hf(pair, prompt_ids, eos, tokenizer, name, with_eos):
    model, hf = pair
    options = OPTIONS[name]
    eos_id = eos if with_eos else None
    # HF's n-gram ban reads its padding as tokens; eos (never inside a running beam) cannot match
    pad = eos if with_eos else tokenizer.eos_id
    config = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos_id, **options)
    ours = _beam_decode(model, prompt_ids, config)
    theirs, scores = hf_beam(hf, prompt_ids, options, eos_id, pad)
    assert [h.tokens for h in ours] == theirs
    assert [h.tokens for h in ours] == generate_ids(model, prompt_ids, config)
    torch.testing.assert_close(
        torch.tensor([h.score for h in ours]), torch.tensor(scores), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", ["beams-3", "length-penalty-2", "everything"])
def test_one_unpadded_prompt_matches_hf(pair, prompt_ids, eos, name):
    model, hf = pair
    config = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, **OPTIONS[name])
    theirs, _ = hf_beam(hf, prompt_ids[:1], OPTIONS[name], eos, eos)
    assert generate_ids(model, prompt_ids[:1], config) == theirs


def test_eos_ends_hypotheses_early(pair, prompt_ids, eos):
    """The parity cases above do exercise early ends: some hypotheses stop at eos, some run on."""
    model, _ = pair
    config = GenerationConfig(
        max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, num_beams=4, num_return_sequences=4
    )
    hyps = _beam_decode(model, prompt_ids, config)
    reasons = {h.finish_reason for h in hyps}
    assert reasons == {"eos", "length"}
    for h in hyps:
        assert eos not in h.tokens
        assert (len(h.tokens) < N_NEW) if h.finish_reason == "eos" else (len(h.tokens) == N_NEW)
    # best first within each prompt
    for p in range(len(PROMPTS)):
        scores = [h.score for h in hyps[4 * p : 4 * p + 4]]
        assert scores == sorted(scores, reverse=True)


def test_min_new_tokens_holds_back_eos(pair, prompt_ids, eos):
    model, _ = pair
    base = dict(max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, num_beams=4, num_return_sequences=4)
    free = _beam_decode(model, prompt_ids, GenerationConfig(**base))
    held = _beam_decode(model, prompt_ids, GenerationConfig(**base, min_new_tokens=8))
    assert min(len(h.tokens) for h in free) < 8 <= min(len(h.tokens) for h in held)


@pytest.mark.parametrize(
    "options",
    [dict(do_sample=False), dict(do_sample=True, top_k=30, seed=3), dict(do_sample=True, seed=5)],
    ids=["greedy", "sample-top-k", "sample"],
)
def test_min_new_tokens_without_beams_matches_hf(pair, prompt_ids, eos, options):
    """min_new_tokens applies to greedy decoding and sampling too (HF's MinNewTokensLengthLogitsProcessor)."""
    model, hf = pair
    options = dict(options)
    seed = options.pop("seed", 0)
    config = GenerationConfig(max_new_tokens=N_NEW, min_new_tokens=5, eos_token_id=eos, seed=seed, **options)
    hf_options = dict(options, top_k=options.get("top_k", 0))
    # HF draws for finished rows too, we do not: sampled rows part ways once one ends, so sampling
    # is compared one prompt at a time
    batches = [[p] for p in prompt_ids] if config.do_sample else [prompt_ids]
    for batch in batches:
        ours = generate_ids(model, batch, config)
        L = max(map(len, batch))
        ids = torch.tensor([[eos] * (L - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch])
        torch.manual_seed(seed)  # HF samples from the global RNG; ours from a generator with this seed
        out = hf.generate(
            ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=5, eos_token_id=eos,
            pad_token_id=eos, **hf_options,
        )
        theirs = [r[: r.index(eos)] if eos in r else r for r in out[:, L:].tolist()]
        assert ours == theirs
        assert all(len(ids) >= 5 for ids in ours)


# --- our own invariants -------------------------------------------------------------------------

KINDS = {
    "learned": {},
    "rotary": dict(position="rotary"),
    "modern": dict(position="rotary", n_kv_head=1, norm="rmsnorm", activation="swiglu", bias=False),
}
SEARCHES = {
    "plain": dict(num_beams=3, num_return_sequences=3),
    "penalties": dict(
        num_beams=4, num_return_sequences=2, repetition_penalty=1.4, no_repeat_ngram_size=2,
        min_new_tokens=2, early_stopping="never", length_penalty=0.5,
    ),
}


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_cached_and_uncached_agree(tokenizer, kind, search):
    torch.manual_seed(1)
    model = tiny_gpt(tokenizer.vocab_size, block_size=64, **KINDS[kind]).double()
    ids = tokenizer.encode_batch(["Pack my", "A", "The quick brown fox"])
    options = dict(max_new_tokens=10, do_sample=False, eos_token_id=ids[2][-1], **SEARCHES[search])
    cached = generate_ids(model, ids, GenerationConfig(use_cache=True, **options))
    uncached = generate_ids(model, ids, GenerationConfig(use_cache=False, **options))
    assert cached == uncached


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_batched_prompts_match_each_prompt_alone(pair, prompt_ids, eos, early_stopping):
    """A prompt's search is its own: its batch neighbours and their padding change nothing."""
    model, _ = pair
    config = GenerationConfig(
        max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, num_beams=3,
        num_return_sequences=2, early_stopping=early_stopping,
    )
    batched = generate_ids(model, prompt_ids, config)
    alone = [seq for p in prompt_ids for seq in generate_ids(model, [p], config)]
    assert batched == alone


def test_restores_training_mode(pair, prompt_ids):
    model, _ = pair
    model.train()
    generate_ids(model, prompt_ids, GenerationConfig(max_new_tokens=3, do_sample=False, num_beams=2))
    assert model.training
    model.eval()


def test_on_step_is_refused(pair, prompt_ids):
    model, _ = pair
    with pytest.raises(LmforgeError, match="on_step"):
        generate_ids(
            model, prompt_ids, GenerationConfig(max_new_tokens=3, do_sample=False, num_beams=2),
            on_step=lambda step: None,
        )


def test_too_long_prompt_is_refused(pair, prompt_ids):
    model, _ = pair
    with pytest.raises(LmforgeError, match="block_size"):
        generate_ids(model, prompt_ids, GenerationConfig(max_new_tokens=64, do_sample=False, num_beams=2))


# --- text API ----------------------------------------------------------------------------------


def test_generate_text_with_beams(pair, tokenizer, eos):
    model, _ = pair
    pieces: dict[int, list[str]] = {}
    config = GenerationConfig(
        max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, num_beams=4, num_return_sequences=3
    )
    results = generate(
        model, tokenizer, PROMPTS, config,
        on_text=lambda i, piece: pieces.setdefault(i, []).append(piece),
    )
    ids = generate_ids(model, tokenizer.encode_batch(PROMPTS), config)
    assert [r.prompt for r in results] == [p for p in PROMPTS for _ in range(3)]
    assert [r.token_ids for r in results] == ids
    for i, r in enumerate(results):
        assert r.text == tokenizer.decode(r.token_ids)
        assert "".join(pieces.get(i, [])) == r.text  # sent once the search is over
        assert r.finish_reason == ("length" if len(r.token_ids) == N_NEW else "eos")
    assert {r.finish_reason for r in results} == {"eos", "length"}


def test_stop_string_cuts_a_hypothesis(pair, tokenizer):
    model, _ = pair
    config = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, num_beams=3, eos_token_id=None)
    (full,) = generate(model, tokenizer, PROMPTS[0], config)
    middle = len(full.text) // 2
    stop = full.text[middle : middle + 3]  # a stop string from the middle of the text
    (cut,) = generate(model, tokenizer, PROMPTS[0], dataclasses.replace(config, stop=[stop]))
    assert stop and cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


# --- configuration and CLI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3, do_sample=False), "num_return_sequences"),
        (dict(num_beams=2, do_sample=True), "do_sample"),
        (dict(num_beams=2, do_sample=False, early_stopping="sometimes"), "early_stopping"),
        (dict(early_stopping=1), "early_stopping"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(length_penalty=float("inf")), "length_penalty"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
    ],
)
def test_invalid_beam_config_names_the_field(options, field):
    with pytest.raises(LmforgeError, match=field):
        GenerationConfig(**options)


def test_beam_config_from_strings():
    config = from_dict(
        GenerationConfig,
        {"num_beams": "4", "do_sample": "false", "early_stopping": "never", "length_penalty": "-0.5"},
    )
    assert (config.num_beams, config.early_stopping, config.length_penalty) == (4, "never", -0.5)
    assert from_dict(GenerationConfig, {"early_stopping": "true"}).early_stopping is True
    assert from_dict(GenerationConfig, {"early_stopping": "false"}).early_stopping is False
    with pytest.raises(LmforgeError, match="early_stopping"):
        from_dict(GenerationConfig, {"early_stopping": "soon"})


def parse(*argv):
    return generation_config_from_args(build_parser().parse_args(["generate", "ckpt", *argv]), 20)


def test_cli_beam_options():
    config = parse(
        "--num-beams", "4", "--length-penalty", "-0.5", "--early-stopping", "never",
        "--min-new-tokens", "3", "--num-return-sequences", "2",
    )
    assert (config.num_beams, config.length_penalty, config.early_stopping) == (4, -0.5, "never")
    assert (config.min_new_tokens, config.num_return_sequences) == (3, 2)
    assert not config.do_sample  # beam search is a search: no --greedy needed
    assert parse("--num-beams", "2", "--early-stopping", "True").early_stopping is True
    assert parse().early_stopping is False and parse().num_beams == 1 and parse().do_sample


def test_cli_generate_with_beams(tmp_path, tokenizer, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_gpt(tokenizer.vocab_size, block_size=64), tokenizer)
    argv = ["generate", str(ckpt), "--prompt", "The", "--max-new-tokens", "6", "--num-beams", "3"]
    assert main([*argv, "--num-return-sequences", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and all(len(r["token_ids"]) <= 6 for r in out)
    assert main(argv) == 0  # one sequence, but beam search does not stream
    assert "beam 1" in capsys.readouterr().out
    assert main([*argv, "--num-return-sequences", "4"]) == 2
    assert "num_return_sequences" in capsys.readouterr().err
